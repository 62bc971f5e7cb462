"""``phantom-ray serve``: run a Serve config file's applications locally until interrupted.

    phantom-ray serve --config serve/local-cpu.yaml [--host 127.0.0.1] [--port 8000] [--num-cpus 2]

Starts (or joins, with ``--address``) a Ray runtime, starts Serve's HTTP proxy on host:port and
deploys every application of the config file with its ``args``; Ctrl-C shuts Serve down. The same
file also works with Ray's CLI (``serve run`` / ``serve deploy``).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from phantom_ray import storage


def register(subparsers) -> None:
    from phantom_ray.logs import add_verbose_flag

    p = subparsers.add_parser("serve", help="serve Phantom models over an OpenAI-compatible HTTP API",
                              description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="example:\n  phantom-ray serve --config serve/local-cpu.yaml --port 8000")
    add_verbose_flag(p)
    p.add_argument("--config", required=True, help="Serve config YAML (e.g. serve/local-cpu.yaml)")
    p.add_argument("--host", default=None, help="HTTP host (default: the file's http_options.host or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the file's http_options.port or 8000)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray runtime (default: all)")
    p.set_defaults(func=run)


def load_serve_config(path: str):
    """The file validated by Ray Serve's schema, each application's args by ours."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from phantom_ray.serving.config import parse_args

    with open(path) as f:
        raw = yaml.safe_load(f)
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{path}: not a valid Ray Serve config:\n{exc}") from exc
    for app in schema.applications:
        if app.import_path == "phantom_ray.serving.app:build_app":
            try:
                parse_args(app.args or {})
            except ValidationError as exc:
                raise ValueError(f"{path}: application {app.name!r} args are invalid:\n{exc}") from exc
    return schema


def _build(app_schema):
    module_name, _, attr = app_schema.import_path.replace(":", ".").rpartition(".")
    target = getattr(importlib.import_module(module_name), attr)
    if callable(target) and not hasattr(target, "bind"):
        return target(app_schema.args or {})
    return target


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from phantom_ray.logs import setup_logging

    logs = setup_logging(None, verbose=args.verbose, name="serve")
    try:
        schema = load_serve_config(args.config)
    except (OSError, ValueError) as exc:
        print(f"phantom-ray serve: {exc}", file=sys.stderr)
        return 2
    host = args.host or schema.http_options.host or "127.0.0.1"
    port = args.port or schema.http_options.port or 8000
    # the job's runtime_env carries the storage settings and the applications' env_vars to every
    # replica, on a local Ray and on a cluster alike
    env_vars: dict[str, str] = dict(storage.storage_env())
    for app in schema.applications:
        env_vars.update((app.runtime_env or {}).get("env_vars", {}))
    init_kwargs = {"address": args.address} if args.address else {"num_cpus": args.num_cpus}
    from phantom_ray.runtime import init_ray

    init_ray(**init_kwargs, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=logs.verbose)
    logs.attach_ray()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port,
                                  "request_timeout_s": schema.http_options.request_timeout_s},
                    logging_config=logs.serve_logging_config())
        logs.quiet()  # serve.start gave the "ray.serve" logger a console handler
        for app in schema.applications:
            serve.run(_build(app), name=app.name, route_prefix=app.route_prefix, blocking=False)
        names = ", ".join(a.name for a in schema.applications)
        print(f"phantom-ray serve: {names} on http://{host}:{port} (OpenAI API under /v1); Ctrl-C to stop",
              flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
        logs.close()
    return 0
