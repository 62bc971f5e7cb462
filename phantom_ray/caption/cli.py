"""``phantom-ray caption``: caption every image under a prefix (or in a manifest) with Ray Data.

    phantom-ray caption --input s3://bucket/images/ --output s3://bucket/captions/phantom-7b/ \\
        --model s3://bucket/export/phantom-7b --max-replicas 16 --num-gpus 1 --batch-size 32

    phantom-ray caption --input manifest.parquet --prompt-column question --output out/ --model ckpt/

Re-running the same command after a crash or preemption captions only the chunks not yet in
``--output``; every input row ends up in exactly one output row (a caption or an error), with the
manifest's columns carried through. The same input spelled differently (relative/absolute, a
trailing slash, ``s3://b//k``) is the same job; another input into the same ``--output`` is refused.
A preset name as ``--model`` (e.g. tiny-qwen2) means random weights: for smoke tests only.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from phantom_ray.caption.config import DEFAULT_PROMPT
    from phantom_ray.config import add_deprecated_alias

    p.add_argument("--input", required=True,
                   help="images: s3://bucket/prefix or a local directory (listed page by page, filtered by image "
                        "extension), or a parquet/JSONL/CSV manifest whose columns are carried into the output")
    p.add_argument("--output", required=True, help="where the caption shards go: s3://bucket/prefix or a directory")
    p.add_argument("--model", required=True, help="preset name (random weights), checkpoint directory or s3:// checkpoint")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "vllm"],
                   help="generation backend (auto: vllm where installed, else torch)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"question asked about every image (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompt-column", default=None, help="manifest column holding each row's prompt (instead of --prompt)")
    p.add_argument("--image-column", default=None,
                   help="manifest column holding the image URI (default: the first of image_uri, uri, image, path, url, file)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens generated per image (vLLM/OpenAI's name)")
    add_deprecated_alias(g, "--max-new-tokens", "--max-tokens", type=int)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = greedy/sampling)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0, help="preset weights and per-image sampling seeds")
    r = p.add_argument_group("resources")
    r.add_argument("--batch-size", type=int, default=8, help="images per generate call on each replica")
    r.add_argument("--min-replicas", type=int, default=1, help="autoscaling actor pool: fewest model replicas")
    r.add_argument("--max-replicas", type=int, default=None,
                   help="autoscaling actor pool: most model replicas (default: as many as the cluster can hold once "
                        "its autoscaler has added every node it may, at most one per chunk; docs/cluster.md#captioning)")
    r.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per replica (0.5 puts two replicas on a GPU; default 1 if the cluster has GPUs, else 0)")
    r.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    r.add_argument("--io-threads", type=int, default=8, help="threads per replica fetching/opening images ahead of the model")
    r.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    r.add_argument("--attn-implementation", default="sdpa", choices=["eager", "sdpa", "flash"])
    r.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local one)")
    o = p.add_argument_group("output")
    o.add_argument("--format", default="parquet", choices=["parquet", "jsonl"])
    o.add_argument("--shard-size", type=int, default=1000, help="rows per chunk (= per output shard)")
    o.add_argument("--list-page-size", type=int, default=1000, help="keys per S3 listing request")
    o.add_argument("--max-pixels", type=int, default=None, help="images with more pixels become error rows")
    o.add_argument("--max-image-bytes", type=int, default=None,
                   help="files larger than this become error rows (default: the ingest limit, 20 MiB)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    from phantom_ray.logs import add_verbose_flag

    add_verbose_flag(p)
    return p


def config_from_args(args: argparse.Namespace):
    """Flags -> CaptionConfig (validated; paths canonicalised here, on the driver)."""
    from phantom_ray.caption.config import CaptionConfig

    # the sampling seed is part of the recorded settings only when sampling (temperature > 0), so greedy
    # runs record the same settings however launched (CLI or Python API)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "num_beams": args.num_beams,
                "seed": args.seed if args.temperature > 0 else None, "stop": list(args.stop)}
    return CaptionConfig.from_dict(dict(
        input=args.input, output=args.output, model=args.model, engine=args.engine, prompt=args.prompt,
        prompt_column=args.prompt_column, image_column=args.image_column, sampling=sampling,
        batch_size=args.batch_size, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        num_gpus=args.num_gpus, num_cpus=args.num_cpus, io_threads=args.io_threads, format=args.format,
        shard_size=args.shard_size, list_page_size=args.list_page_size, max_pixels=args.max_pixels,
        max_image_bytes=args.max_image_bytes, dtype=args.dtype, attn_implementation=args.attn_implementation,
        seed=args.seed, progress=not args.no_progress), source="phantom-ray caption flags")


def run(args: argparse.Namespace) -> int:
    from phantom_ray.caption.job import format_summary, run_caption
    from phantom_ray.logs import setup_logging

    logs = setup_logging(None, verbose=args.verbose, name="caption")
    try:
        cfg = config_from_args(args)
    except ValueError as exc:  # ConfigError, SamplingParams' checks
        print(f"phantom-ray caption: {exc}", file=sys.stderr)
        return 2
    logs.init_ray(args.ray_address)
    try:
        summary = run_caption(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"phantom-ray caption: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(json.dumps(summary))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("caption", help="caption a bucket of images with an autoscaled Ray Data pipeline",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="example (after `make quickstart`):\n  phantom-ray caption --input .phantom_ray_quickstart/"
                                     "caption-input --output /tmp/captions --model .phantom_ray_quickstart/step2-export "
                                     "--max-tokens 8")
    add_arguments(p)
    p.set_defaults(func=run)
