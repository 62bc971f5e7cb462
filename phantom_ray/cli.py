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
    "caption": "phantom_ray.infer.cli",
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


def _one_line(exc: BaseException) -> str:
    # a Ray task error carries the remote traceback in its text: its cause says it in one line
    cause = getattr(exc, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    from phantom_ray.config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ConfigError) as exc:
        # a missing model, file or config field is the user's to fix: one line, no traceback
        # (-v keeps the traceback for a bug report)
        if getattr(args, "verbose", False):
            raise
        print(f"phantom-ray {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
