"""Ray job entry point: pack a corpus into parquet shards in object storage (thin: parse -> build -> run).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/pack.py \
        --input s3://phantom-ray/corpora/phantom-triples/ --layout triples \
        --output s3://phantom-ray/packed/phantom-triples

Same arguments as ``phantom-ray data pack``. Packing runs as Ray tasks (one per chunk) on the CPU
worker group and is resumable: submitting the same command again skips the shards already written.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from phantom_ray.data.cli import add_pack_arguments

    return add_pack_arguments(argparse.ArgumentParser(prog="jobs/pack.py", description=__doc__.splitlines()[0]))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
