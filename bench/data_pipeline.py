"""Throughput of `data pack` and of the training input pipeline, from a moto S3 server on loopback.

    .venv/bin/python bench/data_pipeline.py --num-samples 512 --image-size 448 --cpus 2

Prints samples/s (and per CPU core) of
  1. pack: synthetic LLaVA-layout corpus in S3 (JSON + one PNG per sample) -> parquet shards in S3,
     as Ray tasks (fetch, decode check, sha256, parquet write);
  2. the training input pipeline: read_parquet from S3 -> mixture/selection -> decode + dynamic
     tiling + tokenize (PhantomProcessor in map_batches actors) -> iter_torch_batches + collate,
     consumed by the driver as one training worker would;
and the rows/s one H100 would consume training phantom-0.5b, estimated from the model's FLOPs, to
show whether the pipeline keeps it fed. The tokenizer is the tiny preset's (the real Qwen2 one is
not bundled); images are tiled at --image-size like the real 448-px ViT, so decode/tile cost is real.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def h100_rows_per_s(preset: str, tokens_text: int, tiles: float, mfu: float, peak_tflops: float,
                    step: str) -> dict:
    """Training rows/s one H100 sustains for ``preset`` (dense FLOPs: 2 fwd + 4 bwd per param-token)."""
    from phantom_ray.model.config import PhantomConfig

    cfg = PhantomConfig.from_preset(preset)
    llm, vit = cfg.llm_config, cfg.vision_config
    kv = llm.num_key_value_heads * llm.head_dim
    per_layer = llm.hidden_size * (2 * llm.hidden_size + 2 * kv) + 3 * llm.hidden_size * llm.intermediate_size
    n_llm = llm.num_hidden_layers * per_layer + llm.vocab_size * llm.hidden_size  # + lm_head
    n_vit = vit.num_hidden_layers * (4 * vit.hidden_size**2 + 2 * vit.hidden_size * vit.intermediate_size)
    vit_tokens_per_tile = (vit.image_size // vit.patch_size) ** 2 + 1
    llm_tokens = tokens_text + tiles * cfg.num_image_token
    # step 1 (PO): ViT frozen and run forward only; LLM body frozen but backprop flows through it
    # (activation grads: ~2x fwd) -> 4 N T; step 2: everything trained -> 6 N T.
    llm_mult, vit_mult = (4, 2) if step == "1" else (6, 6)
    flops = llm_mult * n_llm * llm_tokens + vit_mult * n_vit * vit_tokens_per_tile * tiles
    rows = mfu * peak_tflops * 1e12 / flops
    return {"preset": preset, "llm_params_M": round(n_llm / 1e6), "vit_params_M": round(n_vit / 1e6),
            "llm_tokens_per_row": llm_tokens, "tflop_per_row": round(flops / 1e12, 2),
            "assumed_mfu": mfu, "peak_bf16_tflops": peak_tflops, "train_step": step,
            "rows_per_s": round(rows, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=448, help="synthetic image side and ViT tile size")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--preprocess-tasks", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size-mb", type=float, default=0.25, help="small: several blocks stream")
    ap.add_argument("--h100-text-tokens", type=int, default=400, help="text tokens of a real row (estimate)")
    ap.add_argument("--h100-tiles", type=float, default=5.0, help="tiles of a real row incl. thumbnail")
    ap.add_argument("--h100-mfu", type=float, default=0.4)
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    args = ap.parse_args()

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server._server.server_port}",
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    import boto3
    import ray
    import torch

    from phantom_ray.data.pack import pack
    from phantom_ray.data.pipeline import (DataConfig, build_train_dataset, default_processor_factory,
                                           iter_config_batches)
    from phantom_ray.data.synth import LAYOUT_FILES, synthesize

    torch.set_num_threads(1)
    boto3.client("s3").create_bucket(Bucket="bench")
    t = time.perf_counter()
    synthesize("s3://bench/corpus", num_samples=args.num_samples, layout="llava", image_size=args.image_size,
               heldout_fraction=0.0)
    synth_s = time.perf_counter() - t

    from phantom_ray.runtime import init_ray

    init_ray(num_cpus=args.cpus, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    t = time.perf_counter()
    m = pack(f"s3://bench/corpus/{LAYOUT_FILES['llava']}", "llava", "s3://bench/packed",
             shard_size_mb=args.shard_size_mb, executor="ray")
    pack_s = time.perf_counter() - t

    overrides = {"force_image_size": args.image_size}
    cfg = DataConfig(shards="s3://bench/packed", batch_size=args.batch_size,
                     num_preprocess_tasks=args.preprocess_tasks, preprocess_num_cpus=1.0,
                     read_num_cpus=0.25, shuffle_buffer_size=64, max_length=8192)
    import functools

    factory = functools.partial(default_processor_factory, cfg.model, cfg.max_length, **overrides)
    proc = factory()
    ds = build_train_dataset(cfg, processor_factory=factory)
    rows, tokens, tiles, first = 0, 0, 0, None
    t = time.perf_counter()
    for batch in iter_config_batches(ds.iterator(), proc, cfg):
        if first is None:
            first = time.perf_counter() - t
        rows += len(batch["sample_id"])
        tokens += int(batch["attention_mask"].sum())
        tiles += int(batch["num_tiles"].sum())
    pipe_s = time.perf_counter() - t
    ray.shutdown()

    # single-core cost of the per-row work on realistic photos (800x600 JPEG -> 4 tiles + thumbnail)
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from phantom_ray import storage
    from phantom_ray.data.pipeline import CollateProcessed, process_row

    shard = pq.read_table(io.BytesIO(storage.read_bytes(f"s3://bench/packed/{m['shards'][0]['path']}"))).to_pylist()[:48]
    for r in shard:
        buf = io.BytesIO()
        Image.open(io.BytesIO(r["image"])).convert("RGB").resize((800, 600)).save(buf, format="JPEG", quality=90)
        r["image"] = buf.getvalue()
    collate = CollateProcessed(proc, "sft", "right", cfg.pixel_dtype)
    t = time.perf_counter()
    done = [process_row(r, proc, "sft", cfg.pixel_dtype) for r in shard]
    t_proc = time.perf_counter() - t
    cols = {k: [d[k] for d in done] for k in done[0]}
    import numpy as np

    t = time.perf_counter()
    for i in range(0, len(done), args.batch_size):
        collate({k: np.array(v[i:i + args.batch_size] + [None], dtype=object)[:-1] for k, v in cols.items()})
    t_coll = time.perf_counter() - t
    photo_rate = len(shard) / (t_proc + t_coll)
    photo_tiles = sum(sum(d["num_tiles"]) for d in done) / len(done)
    server.stop()

    # real Phantom rows (not the tiny synthetic ones) set the GPU's appetite
    h100 = [h100_rows_per_s("phantom-0.5b", tokens_text=args.h100_text_tokens, tiles=args.h100_tiles,
                            mfu=args.h100_mfu, peak_tflops=989.0, step=s) for s in ("1", "2")]
    steady = (rows - args.batch_size) / max(pipe_s - first, 1e-9) if first is not None else 0.0
    out = {
        "host_cpus": os.cpu_count(), "ray_cpus": args.cpus, "load_avg_1m": round(os.getloadavg()[0], 1),
        "num_samples": args.num_samples, "image_px": args.image_size, "synth_s": round(synth_s, 2),
        "pack": {"rows": m["rows"], "shards": len(m["shards"]), "bytes": m["bytes"], "seconds": round(pack_s, 2),
                 "rows_per_s": round(m["rows"] / pack_s, 1), "rows_per_s_per_core": round(m["rows"] / pack_s / args.cpus, 1)},
        "pipeline": {"rows": rows, "seconds": round(pipe_s, 2), "first_batch_s": round(first or 0, 2),
                     "rows_per_s": round(rows / pipe_s, 1), "steady_rows_per_s": round(steady, 1),
                     "steady_rows_per_s_per_core": round(steady / args.cpus, 1),
                     "tiles_per_row": round(tiles / max(rows, 1), 2), "tokens_per_row": round(tokens / max(rows, 1), 1),
                     "preprocess_tasks": args.preprocess_tasks},
        "per_row_800x600_jpeg_one_core": {"rows_per_s": round(photo_rate, 1), "tiles_per_row": round(photo_tiles, 2),
                                          "process_ms": round(1000 * t_proc / len(shard), 1),
                                          "collate_ms": round(1000 * t_coll / len(shard), 2)},
        "h100_phantom_0.5b": h100,
    }
    need = max(h["rows_per_s"] for h in h100)
    out["cores_to_feed_one_h100_800x600"] = round(need / photo_rate, 1)
    print(json.dumps(out, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
