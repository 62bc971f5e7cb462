"""Captioning at bucket scale: the driver's peak memory against the number of input images, and end-to-end
images/s of the Ray Data pipeline against a one-at-a-time loop (tiny preset, CPU by default).

    .venv/bin/python bench/caption.py                       # 1,000 vs 50,000 images; 2,000 for speed
    .venv/bin/python bench/caption.py --rss-images 1000,5000 --speed-images 500   # quicker

1. Driver peak RSS: ``phantom-ray caption`` runs as its own process (joined to a Ray instance the
   bench starts, so Ray's own daemons are not counted) over a local folder of N small images (one
   tiny PNG hard-linked N times: fast to make), 1 new token each; its peak RSS comes from
   ``wait4``'s rusage. Target (issue #15): growth from 1,000 to 50,000 images <= 40 MiB.
2. Speed at --speed-images: the one-at-a-time loop (``engine.generate([one request])`` per image,
   one process, one torch thread) vs the pipeline end to end (plan, Ray Data and actor start-up,
   model load included) and in steady state (the summary's split). Target: end to end >= 4x the loop.

3. ``--vs-engine``: how close the pipeline comes to the engine itself. Images/s of
   ``phantom-ray caption --engine vllm`` with one replica after start-up (the summary's steady
   state: from the first finished chunk to the end) divided by the same engine's own offline
   throughput (``vllm.LLM.generate`` over all the images at once, built by the replica's own
   ``load_caption_engine``, prompts and images prepared before the clock starts) on the same images
   and prompt. Last line ``caption pipeline/engine images/s: X.XX`` (target >= 0.85):

       PYTHONPATH=. flock /tmp/phantom_heavy.lock .venv/bin/python bench/caption.py --vs-engine

Not part of the test suite; timings never decide pass/fail. Random weights rarely emit a stop
token, so every caption runs to --max-tokens: the work per image is the same in every mode.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROMPT = "Describe the image in detail."


def _folder(root: Path, n: int, distinct: int = 64) -> Path:
    """``n`` PNGs under ``root`` (1,000 per sub-folder): ``distinct`` small images, hard-linked."""
    import numpy as np
    from PIL import Image

    src = root / "_src"
    src.mkdir(parents=True, exist_ok=True)
    originals = []
    for i in range(distinct):
        arr = np.random.default_rng(i).integers(0, 255, (24 + i % 5 * 8, 24 + i % 7 * 6, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        p = src / f"s{i:03d}.png"
        p.write_bytes(buf.getvalue())
        originals.append(p)
    images = root / "images"
    for i in range(n):
        d = images / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        os.link(originals[i % distinct], d / f"img{i:07d}.png")
    return images


def _cli(images: Path, out: Path, args, replicas: int) -> list[str]:
    return [sys.executable, "-m", "phantom_ray.cli", "caption", "--input", str(images), "--output", str(out),
            "--model", args.model, "--engine", "torch", "--max-tokens", str(args.max_tokens),
            "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--num-gpus",
            str(args.num_gpus), "--num-cpus", str(args.replica_cpus), "--min-replicas", str(replicas),
            "--max-replicas", str(replicas), "--no-progress"]


def _run_driver(cmd: list[str], env: dict) -> tuple[float, dict, float]:
    """Run the driver process; (peak RSS MiB, summary, wall s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"driver failed ({proc.returncode}): {err.decode()[-3000:]}")
    # ru_maxrss of terminated children (KiB on Linux); each driver is the only child waited for
    # since the previous call, so take the difference of the high-water mark via a fresh reading
    import resource

    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads(out.decode().strip().splitlines()[-1])
    return peak_kib / 1024, summary, wall


def _rss_child(cmd: list[str], env: dict) -> tuple[float, dict, float]:
    """The driver in a fresh helper process, so RUSAGE_CHILDREN is this driver's alone."""
    helper = [sys.executable, __file__, "--_measure", json.dumps(cmd)]
    res = subprocess.run(helper, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    got = json.loads(res.stdout.strip().splitlines()[-1])
    return got["peak_mib"], got["summary"], got["wall_s"]


def vs_engine(args) -> int:
    """Section 3: pipeline (one vllm replica, steady state) over the engine offline, same images."""
    import ray

    from phantom_ray.caption.stage import _fetch_and_open, load_caption_engine
    from phantom_ray.infer.api import Request, SamplingParams
    from phantom_ray.ingest import DEFAULT_LIMITS
    from phantom_ray.vllm.inputs import vllm_prompt

    tmp = Path(tempfile.mkdtemp(prefix="bench_caption_vllm_"))
    try:
        images = _folder(tmp / "in", args.speed_images)
        cmd = [sys.executable, "-m", "phantom_ray.cli", "caption", "--input", str(images), "--output",
               str(tmp / "out"), "--model", args.model, "--engine", "vllm", "--prompt", PROMPT, "--max-tokens",
               str(args.max_tokens), "--shard-size", str(args.shard_size), "--num-gpus", str(args.num_gpus),
               "--num-cpus", str(args.replica_cpus), "--min-replicas", "1", "--max-replicas", "1", "--no-progress"]
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"caption failed: {res.stderr[-3000:]}")
        s = json.loads(res.stdout.strip().splitlines()[-1])
        ray.shutdown()
        print(f"  pipeline: {s['images_processed']} images, {s['errors']} errors, start-up {s['startup_s']:.1f}s, "
              f"steady {s['steady_images_per_s']:.2f} images/s, end to end {s['images_per_s']:.2f} images/s",
              flush=True)

        # the same engine offline: the replica's own loader and options, all requests in one call
        engine = load_caption_engine(args.model, "vllm", num_gpus=args.num_gpus, dtype="auto", seed=0,
                                     max_length=4096, attn_implementation="sdpa", batch_size=8)
        params = SamplingParams(max_tokens=args.max_tokens)
        uris = sorted(str(p) for p in images.rglob("*.png"))
        prompts, vparams = [], []
        for u in uris:
            req = Request.user(PROMPT, images=[_fetch_and_open(u, DEFAULT_LIMITS)], params=params, key=u)
            sample = engine.prepare(req)
            prompts.append(vllm_prompt(engine.processor, sample, list(req.images)))
            vparams.append(engine._vllm_params(req.params, req.key))
        llm = engine._sync_engine()
        llm.generate(prompts[:8], vparams[:8], use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        llm.generate(prompts, vparams, use_tqdm=False)
        offline = len(prompts) / (time.perf_counter() - t0)
        engine.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"  engine offline (LLM.generate, {len(prompts)} images at once): {offline:.2f} images/s", flush=True)
    print(f"\n{args.model}, {args.max_tokens} new token(s) per image, {args.speed_images} images, shard size "
          f"{args.shard_size}, one replica ({args.replica_cpus} CPUs, num_gpus {args.num_gpus})")
    print(f"caption pipeline/engine images/s: {s['steady_images_per_s'] / offline:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rss-images", default="1000,50000", help="image counts for the driver-RSS runs")
    ap.add_argument("--speed-images", type=int, default=2000)
    ap.add_argument("--model", default="tiny-qwen2")
    ap.add_argument("--max-tokens", type=int, default=1)
    from phantom_ray.config import add_deprecated_alias

    add_deprecated_alias(ap, "--max-new-tokens", "--max-tokens", type=int)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--num-gpus", type=float, default=0.0, help="per replica (0.5: two replicas share a GPU)")
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    ap.add_argument("--vs-engine", action="store_true", help="only section 3: the vllm pipeline (one replica, "
                    "steady state) against the same engine offline; last line: caption pipeline/engine images/s")
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.vs_engine:
        return vs_engine(args)

    if args._measure:
        peak, summary, wall = _run_driver(json.loads(args._measure), dict(os.environ))
        print(json.dumps({"peak_mib": peak, "summary": summary, "wall_s": wall}))
        return 0

    import ray
    import torch

    from phantom_ray.infer.api import Request, SamplingParams, load_engine

    warnings.simplefilter("ignore", UserWarning)
    tmp = Path(tempfile.mkdtemp(prefix="bench_caption_"))
    rows = []
    try:
        from phantom_ray.runtime import init_ray

        init_ray(num_cpus=args.num_cpus, log_to_driver=False)
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

        # ---- 1. speed: one-at-a-time loop vs pipeline ---------------------------------------------
        images = _folder(tmp / "speed", args.speed_images)
        uris = sorted(str(p) for p in images.rglob("*.png"))
        torch.set_num_threads(1)  # the loop gets one core, like each CPU replica
        engine = load_engine(args.model, backend="torch", device="cuda" if args.num_gpus > 0 else "cpu")
        params = SamplingParams(max_tokens=args.max_tokens)

        def req(u):
            from PIL import Image

            return Request(messages=[{"role": "user", "content": PROMPT}], images=[Image.open(u).convert("RGB")],
                           params=params, key=u)

        engine.generate([req(uris[0])])  # warm-up
        n_loop = min(len(uris), 300)
        t0 = time.perf_counter()
        for u in uris[:n_loop]:
            engine.generate([req(u)])
        loop = n_loop / (time.perf_counter() - t0)
        engine.close()
        s = json.loads(subprocess.run(_cli(images, tmp / "speed-out", args, args.replicas), cwd=REPO, env=env,
                                      capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        rows = [("one-at-a-time loop (1 process, 1 thread)", loop, None),
                (f"pipeline, {args.replicas} replica(s), batch {args.batch_size}", s["images_per_s"],
                 s["steady_images_per_s"])]
        print(f"  speed: loop {loop:.1f} images/s, pipeline {s['images_per_s']:.1f} images/s end to end "
              f"({s['steady_images_per_s']:.1f} steady, start-up {s['startup_s']:.1f}s; "
              f"{s['images_per_replica_busy_s']:.1f} images per replica-busy second, {args.replicas} replicas)",
              flush=True)
        # ---- 2. driver peak RSS vs number of images -----------------------------------------------
        rss = []
        for n in [int(x) for x in args.rss_images.split(",") if x]:
            images = _folder(tmp / f"rss{n}", n)
            peak, s, wall = _rss_child(_cli(images, tmp / f"rss{n}-out", args, args.replicas), env)
            rss.append((n, peak, s, wall))
            print(f"  rss run: {n} images, driver peak {peak:.0f} MiB, {s['images_per_s']:.0f} images/s e2e, "
                  f"wall {wall:.0f}s", flush=True)
            shutil.rmtree(tmp / f"rss{n}", ignore_errors=True)

        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{args.model}, {args.max_tokens} new token(s) per image, {os.cpu_count()} CPUs on this machine, "
          f"num_gpus per replica {args.num_gpus}, shard size {args.shard_size}")
    print("\ndriver peak RSS (the caption CLI process alone):")
    print(f"{'images':>8s} {'peak MiB':>9s} {'img/s e2e':>10s} {'start-up s':>11s} {'wall s':>7s}")
    for n, peak, s, wall in rss:
        print(f"{n:8d} {peak:9.0f} {s['images_per_s']:10.1f} {s['startup_s']:11.1f} {wall:7.1f}")
    if len(rss) >= 2:
        print(f"growth {rss[0][0]} -> {rss[-1][0]} images: {rss[-1][1] - rss[0][1]:+.1f} MiB (target <= 40 MiB)")
    if rows:
        loop = rows[0][1]
        print(f"\nspeed at {args.speed_images} images:")
        print(f"{'mode':46s} {'images/s':>9s} {'x loop':>7s} {'steady img/s':>13s} {'x loop':>7s}")
        for name, rate, steady in rows:
            st = f"{steady:13.1f} {steady / loop:7.2f}" if steady else f"{'-':>13s} {'-':>7s}"
            print(f"{name:46s} {rate:9.1f} {rate / loop:7.2f} {st}")
        print("target: pipeline end to end >= 4x the loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
