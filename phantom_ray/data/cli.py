"""``phantom-ray data``: synthesize a corpus, pack corpora into shards, inspect a pack.

    phantom-ray data synth --output /tmp/synth --num-samples 1000 --layout llava --seed 0
    phantom-ray data pack --input /tmp/synth/synth_llava.json --layout llava --output s3://bucket/packed
    phantom-ray data info --output s3://bucket/packed
"""

from __future__ import annotations

import argparse
import json


def _synth(args: argparse.Namespace) -> int:
    from phantom_ray.data.synth import synthesize

    written = synthesize(args.output, num_samples=args.num_samples, layout=args.layout, seed=args.seed,
                         image_size=args.image_size, heldout_fraction=args.heldout_fraction)
    print(json.dumps(written, indent=1))
    return 0


def _pack(args: argparse.Namespace) -> int:
    from phantom_ray.data.pack import pack

    from phantom_ray.logs import setup_logging

    logs = setup_logging(None, verbose=args.verbose, name="data-pack")
    if args.executor == "ray":
        logs.init_ray()
    m = pack(args.input, args.layout, args.output, image_root=args.image_root, shard_size_mb=args.shard_size_mb,
             source=args.source, executor=args.executor, max_in_flight=args.max_in_flight)
    print(json.dumps({k: m[k] for k in ("input_rows", "rows", "errors", "bytes", "pack_seconds")}
                     | {"shards": len(m["shards"]), "sources": list(m["sources"])}))
    return 0


def _info(args: argparse.Namespace) -> int:
    from phantom_ray.data.pack import read_manifest

    m = read_manifest(args.output)
    print(json.dumps({k: v for k, v in m.items() if k != "shards"} | {"shards": len(m["shards"])}, indent=1))
    return 0


def add_pack_arguments(k: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``data pack`` flags (shared with ``jobs/pack.py``)."""
    from phantom_ray.data.readers import LAYOUTS

    k.add_argument("--input", required=True, help="annotation file or directory (local or s3://)")
    k.add_argument("--layout", required=True, choices=LAYOUTS)
    k.add_argument("--image-root", default=None, help="root of relative image paths (default: the input's dir)")
    k.add_argument("--output", required=True, help="local path or s3://bucket/prefix")
    k.add_argument("--shard-size-mb", type=float, default=256.0)
    k.add_argument("--source", default=None, help="source name (default: the input file's stem)")
    k.add_argument("--executor", choices=("ray", "local"), default="ray",
                   help="ray: one Ray task per chunk (default); local: in this process")
    k.add_argument("--max-in-flight", type=int, default=None, help="Ray tasks in flight (default 2x CPUs)")
    from phantom_ray.logs import add_verbose_flag

    add_verbose_flag(k)
    k.set_defaults(func=_pack)
    return k


def register(subparsers) -> None:
    from phantom_ray.data.readers import LAYOUTS

    from phantom_ray.logs import add_verbose_flag

    def _example(cmd: str) -> dict:
        return {"epilog": f"example:\n  {cmd}", "formatter_class": argparse.RawDescriptionHelpFormatter}

    p = subparsers.add_parser("data", help="synthesize, pack and inspect training corpora",
                              **_example("phantom-ray data synth --output /tmp/synth --num-samples 100 --layout llava"))
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    s = sub.add_parser("synth", help="write the synthetic shapes corpus in one or all input layouts",
                       **_example("phantom-ray data synth --output /tmp/synth --num-samples 100 --layout llava"))
    add_verbose_flag(s)
    s.add_argument("--output", required=True, help="local path or s3://bucket/prefix")
    s.add_argument("--num-samples", type=int, default=1000)
    s.add_argument("--layout", choices=LAYOUTS, default=None, help="default: all layouts, one per subdirectory")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--heldout-fraction", type=float, default=0.1)
    s.set_defaults(func=_synth)

    add_pack_arguments(sub.add_parser(
        "pack", help="pack a corpus into parquet shards with a manifest and an errors table",
        **_example("phantom-ray data pack --input /tmp/synth/synth_llava.json --layout llava --output /tmp/packed "
                   "--executor local")))

    i = sub.add_parser("info", help="print a pack's manifest summary",
                       **_example("phantom-ray data info --output /tmp/packed"))
    add_verbose_flag(i)
    i.add_argument("--output", required=True)
    i.set_defaults(func=_info)
