"""Ray job: score a checkpoint on the Phantom paper's benchmarks (phantom_ray.eval), generating
through the Ray Data actor pool of phantom_ray.infer.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/eval.py \
        --config configs/eval/phantom-7b.yaml          # or the same fields as flags:
    python jobs/eval.py --model s3://phantom-ray/models/phantom-7b --benchmarks sqa,pope,chartqa \
        --data-root s3://phantom-ray/benchmarks --output s3://phantom-ray/eval/phantom-7b --num-beams 3
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from phantom_ray.eval.cli import register

    root = argparse.ArgumentParser(prog="jobs/eval.py")
    sub = root.add_subparsers(dest="command")
    register(sub)
    return sub.choices["eval"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
