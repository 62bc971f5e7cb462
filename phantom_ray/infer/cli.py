"""``phantom-ray caption``: caption every image under a prefix (or in a manifest) with Ray Data.

    phantom-ray caption --input s3://bucket/images/ --output s3://bucket/captions/phantom-7b/ \\
        --model s3://bucket/export/phantom-7b --max-replicas 16 --num-gpus 1 --batch-size 32

Re-running the same command after a crash or preemption captions only the images not yet in
``--output``; every input image ends up in exactly one output row (a caption or an error).
A preset name as ``--model`` (e.g. tiny-qwen2) means random weights: for smoke tests only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from phantom_ray.infer.caption import DEFAULT_PROMPT

    p.add_argument("--input", required=True,
                   help="images: s3://bucket/prefix or a local directory (filtered by image extension), "
                        "or a parquet/JSONL manifest with an image_uri/uri/path column")
    p.add_argument("--output", required=True, help="where the caption shards go: s3://bucket/prefix or a directory")
    p.add_argument("--model", required=True, help="preset name (random weights), checkpoint directory or s3:// checkpoint")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"question asked about every image (default: {DEFAULT_PROMPT!r})")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = greedy/sampling)")
    g.add_argument("--seed", type=int, default=0, help="preset weights and per-image sampling seeds")
    r = p.add_argument_group("resources")
    r.add_argument("--batch-size", type=int, default=8, help="images per generate call on each replica")
    r.add_argument("--min-replicas", type=int, default=1, help="autoscaling actor pool: fewest model replicas")
    r.add_argument("--max-replicas", type=int, default=1, help="autoscaling actor pool: most model replicas")
    r.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per replica (0.5 puts two replicas on a GPU; default 1 if the cluster has GPUs, else 0)")
    r.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    r.add_argument("--decode-num-cpus", type=float, default=1.0, help="CPUs per decode/tile task")
    r.add_argument("--decode-concurrency", type=int, default=None, help="most decode tasks at once (default: as CPUs allow)")
    r.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    r.add_argument("--attn-implementation", default="sdpa", choices=["eager", "sdpa", "flash"])
    r.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local one)")
    o = p.add_argument_group("output")
    o.add_argument("--format", default="parquet", choices=["parquet", "jsonl"])
    o.add_argument("--shard-size", type=int, default=1000, help="images per output shard")
    o.add_argument("--max-pixels", type=int, default=None, help="images with more pixels become error rows")
    o.add_argument("--max-image-bytes", type=int, default=64 * 1024 * 1024,
                   help="files larger than this become error rows")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace):
    from phantom_ray.infer.caption import CaptionConfig
    from phantom_ray.infer.api import SamplingParams

    # greedy unless --do-sample (temperature 0 is greedy in SamplingParams)
    if args.do_sample and args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 with --do-sample, got {args.temperature}")
    gen = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature if args.do_sample else 0.0,
                         top_p=args.top_p, top_k=args.top_k, num_beams=args.num_beams, seed=args.seed)
    return CaptionConfig(
        input=args.input, output=args.output, model=args.model, prompt=args.prompt, generation=gen,
        batch_size=args.batch_size, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        num_gpus=args.num_gpus, num_cpus=args.num_cpus, decode_num_cpus=args.decode_num_cpus,
        decode_concurrency=args.decode_concurrency, format=args.format,
        shard_size=args.shard_size, max_pixels=args.max_pixels, max_image_bytes=args.max_image_bytes,
        dtype=args.dtype, attn_implementation=args.attn_implementation, seed=args.seed,
        progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from phantom_ray.infer.caption import _ensure_ray, caption, format_summary

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"phantom-ray caption: {exc}", file=sys.stderr)
        return 2
    _ensure_ray(args.ray_address)
    try:
        summary = caption(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"phantom-ray caption: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(json.dumps(summary))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("caption", help="caption a bucket of images with an autoscaled Ray Data pipeline",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
