"""Captioning throughput: the Ray Data pipeline with 1 and 2 model replicas against a plain
single-process loop that captions the same images one at a time (tiny preset, CPU by default).

    .venv/bin/python bench/caption.py --images 384 --max-new-tokens 16 --batch-size 16

Prints images/s for: the one-at-a-time loop, the in-process engine batched (no Ray), and the
pipeline with 1 and 2 replicas, both end to end (listing, Ray Data start-up, actor start-up
included) and in steady state (from the first shard written to the last), and the ratios to the
loop. The issue's target: batching gives at least 3x the one-at-a-time loop on the same hardware.
Not part of the test suite. Random weights rarely emit a stop token, so every caption runs to
--max-new-tokens: the work per image is the same in every mode.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _images(root: Path, n: int) -> list[str]:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 255, (24 + i % 5 * 8, 24 + i % 7 * 6, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        p = root / f"img{i:05d}.png"
        p.write_bytes(buf.getvalue())
        out.append(str(p))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--model", default="tiny-qwen2")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--num-gpus", type=float, default=0.0, help="per replica (0.5: two replicas share a GPU)")
    ap.add_argument("--replica-cpus", type=float, default=0.75)
    ap.add_argument("--decode-cpus", type=float, default=0.5)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # the loop gets one core, like each CPU replica
    import ray

    from phantom_ray.infer import Request, SamplingParams, load_engine
    from phantom_ray.infer.caption import CaptionConfig, caption

    warnings.simplefilter("ignore", UserWarning)
    tmp = Path(tempfile.mkdtemp(prefix="bench_caption_"))
    try:
        uris = _images(tmp / "images", args.images)
        prompt = "Describe the image in detail."
        engine = load_engine(args.model, backend="torch", device="cuda" if args.num_gpus > 0 else "cpu")
        cfg = SamplingParams(max_tokens=args.max_new_tokens)

        def req(u, params=cfg):
            return Request(messages=[{"role": "user", "content": prompt}], images=[Path(u).read_bytes()], params=params)

        engine.generate([req(uris[0], cfg.replace(max_tokens=2))])  # warm-up

        t0 = time.perf_counter()
        for u in uris:
            engine.generate([req(u)])
        loop = len(uris) / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        engine.generate([req(u) for u in uris], batch_size=args.batch_size)
        batched = len(uris) / (time.perf_counter() - t0)

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        rows = [("one-at-a-time loop (1 process)", loop, None), (f"engine batched x{args.batch_size} (no Ray)", batched, None)]
        for replicas in (1, 2):
            stamps: list[float] = []
            out = tmp / f"out{replicas}"
            t0 = time.perf_counter()
            s = caption(CaptionConfig(
                input=str(tmp / "images"), output=str(out), model=args.model, prompt=prompt, generation=cfg,
                batch_size=args.batch_size, min_replicas=replicas, max_replicas=replicas, num_gpus=args.num_gpus,
                num_cpus=args.replica_cpus, decode_num_cpus=args.decode_cpus, shard_size=args.shard_size,
                progress=False), on_shard=lambda _uri: stamps.append(time.perf_counter()))
            e2e = s["images_processed"] / (time.perf_counter() - t0)
            steady = (len(stamps) - 1) * args.shard_size / (stamps[-1] - stamps[0]) if len(stamps) > 2 else None
            rows.append((f"pipeline, {replicas} replica(s), batch {args.batch_size}", e2e, steady))
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{args.images} images, {args.model}, {args.max_new_tokens} new tokens each, "
          f"{os.cpu_count()} CPUs on this machine, num_gpus per replica {args.num_gpus}")
    print(f"{'mode':46s} {'images/s':>9s} {'x loop':>7s} {'steady img/s':>13s} {'x loop':>7s}")
    for name, rate, steady in rows:
        st = f"{steady:13.1f} {steady / loop:7.2f}" if steady else f"{'-':>13s} {'-':>7s}"
        print(f"{name:46s} {rate:9.1f} {rate / loop:7.2f} {st}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
