"""``phantom-ray train --config PATH [dotted.key=value ...]``: run a training config on Ray.

    phantom-ray train --config configs/train/tiny-cpu.yaml run.max_steps=20 optim.lr=1e-3
"""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="training YAML (local path or s3:// URI)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted overrides of config fields, e.g. optim.lr=3e-4 run.max_steps=100")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--dry-run", action="store_true", help="load and print the resolved config, do not train")
    from phantom_ray.logs import add_verbose_flag

    add_verbose_flag(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from phantom_ray.train.config import TrainConfig

    from phantom_ray.logs import setup_logging

    # relative paths (shards, storage, export, init_from, ...) mean the launch directory: resolve
    # them here, on the driver, before Ray moves anything into its session folder
    cfg = TrainConfig.from_yaml(args.config, overrides=args.overrides).resolved()
    if args.dry_run:
        print(cfg.to_yaml())
        return 0
    import ray

    storage_root = str(cfg.run.storage_path)
    local_run = None if "://" in storage_root else os.path.join(os.path.abspath(storage_root), cfg.run.name)
    logs = setup_logging(local_run, verbose=args.verbose, name=f"train-{cfg.run.name}", quiet_imports=("deepspeed",))

    from phantom_ray import storage
    from phantom_ray.train.ray_trainer import run_training

    # S3 settings reach every worker and Ray Data actor through the job's runtime_env
    logs.init_ray(args.address, runtime_env=storage.storage_runtime_env() or None)
    metrics = run_training(cfg)
    ray.shutdown()  # flush the workers' log lines first, so that the export path is the last line
    logs.close()
    summary = {k: v for k, v in metrics.items() if not k.endswith("_per_worker")}
    print(json.dumps(summary, default=str))
    print(f"exported model: {metrics['export']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="distributed Phantom training (Ray Train + DeepSpeed)",
                              description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="example:\n  phantom-ray train --config configs/train/tiny-cpu.yaml run.max_steps=20")
    add_arguments(p)
    p.set_defaults(func=run)
