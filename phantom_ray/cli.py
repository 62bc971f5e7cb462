"""`phantom-ray` command line: one verb per subcommand, each defined next to the code it runs.

Every subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func=callable(args) -> int``. Modules are imported lazily so that ``phantom-ray model info`` does
not import Ray, and a broken optional dependency only breaks its own verb.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> module that registers it
SUBCOMMANDS = {
    "model": "phantom_ray.model.cli",
    "data": "phantom_ray.data.cli",
    "train": "phantom_ray.train.cli",
    "caption": "phantom_ray.caption.cli",
    "serve": "phantom_ray.serving.cli",
    "eval": "phantom_ray.eval.cli",
    "quickstart": "phantom_ray.quickstart",
    "ask": "phantom_ray.ask",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phantom-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = None
    if argv:
        first = next((a for a in argv if not a.startswith("-")), None)
        wanted = first if first in SUBCOMMANDS else None
    for verb, module in SUBCOMMANDS.items():
        if wanted is not None and verb != wanted:
            sub.add_parser(verb, help=f"(see phantom-ray {verb} --help)")
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue  # not built yet
            raise
        mod.register(sub)
    return parser


def _user_error(exc: BaseException) -> BaseException | None:
    """The phantom_ray user error behind ``exc`` (bad input, config, path or model id), looking
    through Ray's wrappers (a task or actor that failed on the user's input), else None."""
    from phantom_ray.config import ConfigError
    from phantom_ray.ingest import InputError

    user_errors: tuple[type[BaseException], ...] = (InputError, ConfigError, FileNotFoundError, NotADirectoryError,
                                                    IsADirectoryError, PermissionError)
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, user_errors):
            return exc
        # RayTaskError / ActorDiedError keep the original exception as .cause
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A user error (missing file or model, bad config, refused input) is one
    line on stderr and exit status 2, not a traceback; anything else is a bug and keeps its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a user error
        err = _user_error(exc)
        if err is None or getattr(args, "verbose", False):
            raise  # a bug, or -v: keep the traceback
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"phantom-ray {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
