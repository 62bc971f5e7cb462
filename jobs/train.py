"""Ray job entry point: Phantom training from a config (thin: parse -> build -> run).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train.py --config configs/train/phantom-7b-step1.yaml

    (smoke run: --config configs/train/tiny-cpu.yaml; dotted overrides follow the config,
    e.g. run.storage_path=s3://phantom-ray/runs optim.lr=1e-4)

Same arguments as ``phantom-ray train``: ``--config PATH [dotted.key=value ...]``.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from phantom_ray.train.cli import add_arguments

    return add_arguments(argparse.ArgumentParser(prog="jobs/train.py", description=__doc__.splitlines()[0]))


def main(argv: list[str] | None = None) -> int:
    from phantom_ray.train.cli import run

    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
