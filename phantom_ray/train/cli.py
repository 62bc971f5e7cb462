"""``phantom-ray train --config PATH [dotted.key=value ...]``: run a training config on Ray.

    phantom-ray train --config configs/train/tiny-cpu.yaml run.max_steps=20 optim.lr=1e-3
"""

from __future__ import annotations

import argparse
import json
import logging


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="training YAML (local path or s3:// URI)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted overrides of config fields, e.g. optim.lr=3e-4 run.max_steps=100")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--dry-run", action="store_true", help="load and print the resolved config, do not train")
    return parser


def run(args: argparse.Namespace) -> int:
    from phantom_ray.train.config import TrainConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_yaml(args.config, overrides=args.overrides)
    if args.dry_run:
        print(cfg.to_yaml())
        return 0
    import ray

    from phantom_ray.train.ray_trainer import run_training

    if not ray.is_initialized():
        from phantom_ray.runtime import init_ray

        init_ray(address=args.address)
    metrics = run_training(cfg)
    ray.shutdown()  # flush the workers' log lines first, so that the export path is the last line
    summary = {k: v for k, v in metrics.items() if not k.endswith("_per_worker")}
    print(json.dumps(summary, default=str))
    print(f"exported model: {metrics['export']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="distributed Phantom training (Ray Train + DeepSpeed)",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)
