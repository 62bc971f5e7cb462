"""Ray job: batch-caption a bucket of images (phantom_ray.caption), resumable and exactly once.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/caption.py \
        --input s3://phantom-ray/images/unlabelled/ --output s3://phantom-ray/captions/phantom-7b/unlabelled/ \
        --model s3://phantom-ray/models/phantom-7b --engine vllm --num-gpus 1 --min-replicas 1 --max-replicas 32

Submitting the same command again after a failure captions only what is missing.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from phantom_ray.caption.cli import add_arguments

    return add_arguments(argparse.ArgumentParser(prog="jobs/caption.py", description=__doc__.splitlines()[0]))


def main(argv: list[str] | None = None) -> int:
    from phantom_ray.caption.cli import run

    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
