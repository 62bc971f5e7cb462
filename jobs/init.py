"""Ray job entry point: write a step-1 starting checkpoint from public upstream weights (thin: parse -> build -> run).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/init.py \
        --size phantom-7b --source OpenGVLab/InternVL2-8B \
        --output s3://phantom-ray/init/phantom-7b

Same arguments as ``phantom-ray model init`` (docs/checkpoints.md has the command for every size and the
``--vision OpenGVLab/InternViT-300M-448px --llm <base LLM>`` route; cluster/kuberay/rayjob-init.yaml
is the same job for KubeRay). The conversion runs in the job's driver: it reads the source tensor by
tensor and holds one copy of the result (about 16 GiB for phantom-7b in bfloat16), so the driver's
node needs that much memory and disk for the download; reserve them with ``ray job submit
--entrypoint-num-cpus 8 --entrypoint-memory 34359738368`` to keep the driver off a head that has
neither. A ``--source`` may be a hub id (where the cluster reaches the hub), a directory or an
``s3://`` prefix.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from phantom_ray.model.cli import add_init_arguments

    return add_init_arguments(argparse.ArgumentParser(prog="jobs/init.py", description=__doc__.splitlines()[0]))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
