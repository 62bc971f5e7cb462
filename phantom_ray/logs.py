"""Quiet console, everything kept: what every ``phantom-ray`` verb and the quickstart print.

By default the console shows our own lines (stage titles, results, one progress bar per long stage)
and warnings/errors of ``phantom_ray``; everything else is written to files under the run's log
directory, whose path is printed once:

- ``<log dir>/phantom_ray.log``: every Python log record of this process at INFO and above (Ray's
  driver-side messages, Ray Data's execution plans, Serve's, transformers' and DeepSpeed's, Python
  warnings), with timestamps;
- ``<log dir>/ray/``: Ray's session logs (every worker, actor, Train controller, Serve replica and
  Ray Data log), copied there when the run ends (a ``ray-session`` link points at them meanwhile).

``-v/--verbose`` (or ``PHANTOM_RAY_VERBOSE=1``) restores the consoles of all of these: worker lines
stream to the driver again (each once: Ray's de-duplication stays on) and third-party loggers print.

    logs = setup_logging("runs/my-run", verbose=args.verbose, name="train")
    ray.init(**logs.ray_init_kwargs())
    logs.attach_ray()                 # after ray.init: link the session logs, quiet Ray Data/Serve
    with progress(total=400, desc="train step 1", unit="step") as bar: ...
    logs.close()                      # copies Ray's session logs under the log dir
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

VERBOSE_ENV = "PHANTOM_RAY_VERBOSE"
OUR_LOGGER = "phantom_ray"
# third-party loggers that install their own console handlers (so the root logger's filter alone
# does not silence them): their console handlers are removed in quiet mode; records still reach the
# log file through the root logger
_THIRD_PARTY = ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune", "ray.air", "DeepSpeed", "deepspeed",
                "transformers", "torch", "urllib3", "filelock", "httpx", "openai", "werkzeug")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_verbose_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``-v/--verbose`` on a verb's parser (every verb has it)."""
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print Ray, Ray Data, Serve, DeepSpeed and transformers logs on the console "
                             "(by default they go to the run's log directory only)")
    return parser


def is_verbose(args: argparse.Namespace | None = None) -> bool:
    return bool(getattr(args, "verbose", False)) or os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


class _ConsoleFilter(logging.Filter):
    """Quiet console: our warnings and errors, and anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == OUR_LOGGER or record.name.startswith(OUR_LOGGER + "."):
            return record.levelno >= logging.WARNING
        return record.levelno >= logging.ERROR


@dataclass
class RunLogs:
    """The log set-up of one run; see the module docstring."""

    dir: Path
    verbose: bool
    file: Path
    ray_session: Path | None = None
    _handlers: list = field(default_factory=list)
    _closed: bool = False
    _saved_stderr_fd: int | None = None

    def capture_native_stderr(self) -> None:
        """Send what native code writes to file descriptor 2 (Ray's C++ core worker in this process:
        ``core_worker.cc:... Actor with class name ...``) to ``<log dir>/native-stderr.log``, while
        Python's ``sys.stderr`` (our warnings, progress bars) keeps writing to the terminal."""
        if self.verbose or self._saved_stderr_fd is not None:
            return
        try:
            sys.stderr.flush()
            if sys.stderr.fileno() != 2:
                return
        except (AttributeError, OSError, ValueError):  # stderr replaced by a non-file (a test's capture)
            return
        saved = os.dup(2)
        with open(self.dir / "native-stderr.log", "ab") as native:
            os.dup2(native.fileno(), 2)
        self._saved_stderr_fd = saved
        console = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                            errors="backslashreplace")
        sys.stderr = console
        for h in self._handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setStream(console)

    def _restore_stderr(self) -> None:
        if self._saved_stderr_fd is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._saved_stderr_fd, 2)
        os.close(self._saved_stderr_fd)
        self._saved_stderr_fd = None
        replaced, sys.stderr = sys.stderr, sys.__stderr__
        for h in self._handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setStream(sys.stderr)
        if replaced is not sys.__stderr__:
            replaced.close()

    def ray_init_kwargs(self, **kw) -> dict:
        """Arguments for ``ray.init``: worker lines to the driver only when verbose (they are always in
        the session's log files); Ray's own Python loggers at INFO into our file."""
        # no ``logging_config``: Ray's LoggingConfig replaces the driver's root handlers with a console
        # one (every INFO record of every library on stderr); attach_ray re-asserts ours regardless
        out = {"log_to_driver": self.verbose, "include_dashboard": False}
        out.update(kw)
        return out

    def init_ray(self, address: str | None = None, **kw):
        """Start (or join, or reuse) Ray for this run with :meth:`ray_init_kwargs`, then
        :meth:`attach_ray` (through ``phantom_ray.runtime.init_ray``, the one way we start Ray)."""
        import ray

        from phantom_ray.runtime import init_ray

        if not self.verbose:
            _quiet_third_party()  # ray's logger got its console handler on import: "Started a local Ray..."
            self.capture_native_stderr()
        if not ray.is_initialized():
            init_ray(address, **self.ray_init_kwargs(**kw))
        self.attach_ray()
        return ray

    def attach_ray(self) -> None:
        """After ``ray.init``: point ``<log dir>/ray-session`` at this session's logs, turn off Ray Data's
        own progress output (we show one bar per stage) and keep third-party console handlers quiet."""
        import ray

        _install_root(self._handlers)
        if not self.verbose:
            _route_raylet_messages()
        try:
            node = ray._private.worker._global_node  # the driver's node: knows the session directory
            session = Path(node.get_session_dir_path()) if node is not None else None
        except AttributeError:  # a Ray without this private attribute: no link, the logs stay in /tmp/ray
            session = None
        if session is not None and session.is_dir():
            self.ray_session = session
            link = self.dir / "ray-session"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(session, target_is_directory=True)
        if not self.verbose:
            from ray.data import DataContext

            ctx = DataContext.get_current()
            ctx.enable_progress_bars = False
            # Ray Data's "progress will be logged" lines for non-terminals
            if hasattr(ctx, "enable_rich_progress_bars"):
                ctx.enable_rich_progress_bars = False
            _quiet_third_party()

    def quiet(self) -> None:
        """Re-apply the quiet console after a library installed its own console handler (Ray Serve
        adds one to ``ray.serve`` in ``serve.start``)."""
        if not self.verbose:
            _quiet_third_party()

    def serve_logging_config(self) -> dict:
        """Serve's ``logging_config`` (controller, proxy, replicas): warnings only unless verbose."""
        return {"encoding": "TEXT", "log_level": "INFO" if self.verbose else "WARNING", "enable_access_log": self.verbose}

    def close(self) -> None:
        """Copy Ray's session logs under the log dir (the link goes: /tmp/ray is cleaned by the OS)."""
        if self._closed:
            return
        self._closed = True
        if self.ray_session is not None and (self.ray_session / "logs").is_dir():
            dest = self.dir / "ray"
            try:
                shutil.copytree(self.ray_session / "logs", dest, dirs_exist_ok=True,
                                ignore=lambda d, names: [n for n in names if not (Path(d) / n).is_file()
                                                         and not (Path(d) / n).is_dir()],
                                ignore_dangling_symlinks=True)
                link = self.dir / "ray-session"
                if link.is_symlink():
                    link.unlink()
            except (OSError, shutil.Error) as exc:  # a log file vanished mid-copy: keep the link instead
                logging.getLogger(__name__).warning("could not copy Ray's logs from %s: %s", self.ray_session, exc)
        for h in self._handlers:
            h.flush()
        self._restore_stderr()


def _quiet_third_party() -> None:
    """Drop console handlers that third-party libraries attached to their own loggers; their records
    propagate to the root logger (file: everything, console: errors only)."""
    names = [n for n in list(logging.root.manager.loggerDict)
             if any(n == p or n.startswith(p + ".") for p in _THIRD_PARTY)]
    for name in names:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.propagate = True
    try:
        import transformers

        transformers.logging.disable_progress_bar()
        transformers.logging.set_verbosity_warning()
        # transformers keeps its own handler on "transformers": route through the root logger instead
        transformers.logging.disable_default_handler()
        transformers.logging.enable_propagation()
    except ImportError:
        pass
    if "deepspeed" in sys.modules:  # importing it here would print its accelerator line
        ds_logger = logging.getLogger("DeepSpeed")
        ds_logger.setLevel(logging.WARNING)
        for h in list(ds_logger.handlers):
            ds_logger.removeHandler(h)
        ds_logger.propagate = True


def _route_raylet_messages() -> None:
    """Ray prints the raylet's messages to the driver (``(raylet) WARNING: 8 PYTHON worker processes
    have been started...``) straight to stdout, whatever ``log_to_driver`` says. Quiet console: they
    go to the log file as ``ray.raylet`` records, at ERROR (console too) when they report an error or a
    killed worker. Worker lines (verbose mode) still go through Ray's own printer."""
    import ray._private.worker as rw

    original = getattr(rw, "print_to_stdstream", None)
    if original is None or getattr(original, "_phantom_routed", False):
        return
    raylet_log = logging.getLogger("ray.raylet")

    def route(data, ignore_prefix: bool = False):
        if data.get("pid") != "raylet":
            return original(data, ignore_prefix)
        for line in data.get("lines", []):
            # an out-of-memory kill or a crashed worker matters; Ray's own shutdown of actors it
            # killed on purpose ("... killed by `ray.kill`", at serve.shutdown) does not
            serious = (any(w in line for w in ("OutOfMemory", "out of memory", "SIGSEGV", "segmentation fault",
                                               "unexpectedly"))
                       and "ray.kill" not in line)
            raylet_log.log(logging.ERROR if serious else logging.WARNING, "%s", line)

    route._phantom_routed = True
    rw.print_to_stdstream = route


def _install_root(handlers: list) -> None:
    root = logging.getLogger()
    consoles = {id(x) for x in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)}
    for h in list(root.handlers):
        # other console handlers (basicConfig's, Ray's LoggingConfig's) go; handlers that capture
        # elsewhere (a test's log capture, a user's file) stay
        if h not in handlers and isinstance(h, logging.StreamHandler) and id(getattr(h, "stream", None)) in consoles:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(logging.INFO)


def _import_quietly(name: str) -> None:
    """Import ``name`` with its import-time console output captured into the log (DeepSpeed builds
    its logger with a handler on the stdout of the moment: that handler is dropped afterwards)."""
    import contextlib
    import importlib
    import io

    if name in sys.modules:
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            importlib.import_module(name)
    except ImportError:
        return
    finally:
        text = buf.getvalue().strip()
        if text:
            logging.getLogger(f"{OUR_LOGGER}.imports").info("importing %s printed:\n%s", name, text)


def default_log_dir(name: str) -> Path:
    """Where a verb without a local run directory keeps its logs."""
    root = os.environ.get("PHANTOM_RAY_LOG_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "phantom_ray", "logs")
    return Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def setup_logging(run_dir: str | os.PathLike | None = None, *, verbose: bool = False, name: str = "phantom-ray",
                  announce: bool = True, quiet_imports: tuple[str, ...] = ()) -> RunLogs:
    """Configure this process's logging for one run; the log files go to ``<run_dir>/logs`` (or a
    per-run directory under ``~/.cache/phantom_ray/logs`` when ``run_dir`` is None).

    ``quiet_imports``: libraries the run will use that talk while being imported (``deepspeed``
    announces its accelerator on stdout): imported here with that output sent to the log file."""
    verbose = verbose or is_verbose()
    log_dir = Path(run_dir) / "logs" if run_dir is not None else default_log_dir(name)
    log_dir = log_dir.resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    logfile = log_dir / "phantom_ray.log"
    fh = logging.FileHandler(logfile, encoding="utf-8")
    fh.setFormatter(logging.Formatter(_FORMAT))
    fh.setLevel(logging.INFO)
    ch = logging.StreamHandler(sys.stderr)
    ch.setFormatter(logging.Formatter(_FORMAT if verbose else "%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        ch.addFilter(_ConsoleFilter())
    _install_root([fh, ch])
    logging.captureWarnings(True)  # Python warnings -> "py.warnings" logger -> file (console: verbose only)
    if not verbose:
        # child processes (Ray workers started from here) inherit these: quiet libraries there too
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        for name in quiet_imports:
            _import_quietly(name)
        _quiet_third_party()
    logs = RunLogs(dir=log_dir, verbose=verbose, file=logfile, _handlers=[fh, ch])
    if announce:
        print(f"logs: {log_dir}" + ("" if verbose else "  (-v prints them here too)"), flush=True)
    return logs


# ---- progress ----------------------------------------------------------------------------------------

class _PlainProgress:
    """A progress bar for a non-terminal: one plain line every ``interval`` seconds and one at the end."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float, file):
        self.total, self.desc, self.unit, self.interval, self.file = total, desc, unit, interval, file
        self.n, self.t0, self.last = 0, time.perf_counter(), time.perf_counter()
        self.postfix = ""
        self._printed_n = -1

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self._line()
            self.last = now

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def _line(self) -> None:
        if self.n == self._printed_n:
            return
        self._printed_n = self.n
        el = time.perf_counter() - self.t0
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / el:.2f} {self.unit}/s" if el > 0 and self.n else ""
        post = f", {self.postfix}" if self.postfix else ""
        print(f"  {self.desc}: {self.n}{of} {self.unit}{pct}, {el:.0f}s{rate}{post}", file=self.file, flush=True)

    def close(self) -> None:
        self._line()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", *, interval: float = 20.0, file=None):
    """One progress bar: tqdm in a terminal, a plain line every ``interval`` seconds otherwise."""
    file = file or sys.stderr
    if file.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=file, dynamic_ncols=True, leave=True)
    return _PlainProgress(total, desc, unit, interval, file)
