"""Load test of the OpenAI-compatible Serve app: dynamic batching on vs off, tiny preset on CPU.

    .venv/bin/python bench/serve_load.py                      # starts local Ray + Serve itself
    .venv/bin/python bench/serve_load.py --requests 48 --max-tokens 64 --concurrency 1,4,16
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 --models tiny-qwen2   # a running server

``--vs-engine`` measures how close serving comes to the engine itself: one replica of the preset on
``engine: vllm`` (vLLM's own concurrency defaults), ``--clients`` (64) concurrent streaming HTTP
clients over ``--requests`` requests after a warm-up, tokens/s at the clients; then the same engine
(same engine arguments, same prompts: our processor's token ids and images, greedy, ``ignore_eos``)
offline, ``vllm.LLM.generate`` over all the requests at once, tokens/s. The last line is
``serve pipeline/engine tokens/s: X.XX`` (target >= 0.80):

    PYTHONPATH=. flock /tmp/phantom_heavy.lock .venv/bin/python bench/serve_load.py --vs-engine

Without ``--url`` it deploys one application with the same preset twice: ``<preset>-batched``
(``max_batch_size`` 16) and ``<preset>-unbatched`` (``max_batch_size`` 1), then sends a bounded
number of streaming chat requests (an image and a question, greedy, fixed answer length via
``ignore_eos``) from an async HTTP client at each concurrency, and prints requests/s, p50/p99
latency and p50/p99 time to first token per model and concurrency. The target of the serving
issue: at concurrency 16, batching gives >= 3x the throughput of no batching, with p99 latency no
worse than 2x. Exit status 0 whatever the figures (this is a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time

import httpx



def png_bytes(size=(40, 30), color=(200, 30, 30)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def request_body(model: str, i: int, max_tokens: int) -> dict:
    image = data_uri(png_bytes((32 + (i % 4) * 16, 32), ((37 * i) % 255, 120, 200)))
    return {
        "model": model, "stream": True, "stream_options": {"include_usage": True},
        "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": f"Request {i}: describe the picture in detail."},
        ]}],
    }


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, int]:
    """-> (latency s, time to first token s, generated tokens); raises on an HTTP error."""
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event["choices"] and event["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    return latency, ttft if ttft is not None else latency, tokens


async def run_level(url: str, model: str, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    results: list[tuple[float, float, int]] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def user():
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    results.append(await one_request(client, url, request_body(model, i, max_tokens)))
                except (RuntimeError, httpx.HTTPError) as exc:
                    errors.append(str(exc))

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = [r[0] for r in results]
    ttft = [r[1] for r in results]
    return {
        "model": model, "concurrency": concurrency, "requests": len(results), "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "rps": len(results) / wall if wall else 0.0,
        "tokens_per_s": sum(r[2] for r in results) / wall if wall else 0.0,
        "p50_s": percentile(lat, 0.5), "p99_s": percentile(lat, 0.99),
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
        "mean_s": statistics.fmean(lat) if lat else float("nan"),
    }


def start_local_server(preset: str, port: int, max_batch_size: int, batch_wait_s: float) -> tuple[str, list[str]]:
    import ray
    from ray import serve

    from phantom_ray.serving.app import build_app

    common = {"checkpoint": preset, "engine": "torch", "dtype": "float32", "attn_implementation": "sdpa", "num_cpus": 0.5,
              "torch_num_threads": 1, "max_ongoing_requests": 64, "max_queued_requests": 256,
              "batch_wait_timeout_s": batch_wait_s, "num_replicas": 1, "max_tokens_limit": 1024}
    models = [f"{preset}-batched", f"{preset}-unbatched"]
    args = {"models": [{"name": models[0], "max_batch_size": max_batch_size, **common},
                       {"name": models[1], "max_batch_size": 1, **common}],
            "ingress_num_cpus": 0.25}
    from phantom_ray.runtime import init_ray

    init_ray(num_cpus=2, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="phantom-bench", route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{port}", models


VLLM_BENCH = {"engine": "vllm", "max_model_len": 512, "kv_cache_memory_bytes": 256 * 2**20, "block_size": 32}


def request_payload(i: int, max_tokens: int):
    """What the HTTP front makes of ``request_body(.., i, ..)``: the engine request of it."""
    from phantom_ray.infer.api import Request, SamplingParams

    image = png_bytes((32 + (i % 4) * 16, 32), ((37 * i) % 255, 120, 200))
    return Request(messages=[{"role": "user", "content": f"<image>Request {i}: describe the picture in detail."}],
                   images=[image], params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def offline_engine_tokens_per_s(preset: str, n: int, max_tokens: int) -> tuple[float, int, float]:
    """The same engine offline: ``LLM.generate`` over all ``n`` requests at once -> (tokens/s, tokens, s).
    Prompts are built before the clock starts (the engine's own throughput)."""
    from phantom_ray.serving.config import ModelSpec
    from phantom_ray.vllm.engine import VLLMEngine
    from phantom_ray.vllm.inputs import vllm_prompt

    spec = ModelSpec(name=preset, checkpoint=preset, max_prompt_tokens=512, max_tokens_limit=1024, **VLLM_BENCH)
    engine = VLLMEngine.load(preset, max_length=spec.max_prompt_tokens, **spec.engine_options())
    try:
        requests = [request_payload(i, max_tokens) for i in range(n)]
        prompts, params = [], []
        for r in requests:
            sample = engine.prepare(r)
            prompts.append(vllm_prompt(engine.processor, sample, list(r.images)))
            params.append(engine._vllm_params(r.params, "bench"))
        llm = engine._sync_engine()
        llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return tokens / wall, tokens, wall
    finally:
        engine.close()


def vs_engine(a) -> int:
    import ray
    from ray import serve

    from phantom_ray.serving.app import build_app

    model = f"{a.preset}-vllm"
    port = free_port()
    args = {"models": [{"name": model, "checkpoint": a.preset, "num_cpus": 1, "num_replicas": 1,
                        "max_ongoing_requests": max(a.clients, 64), "max_queued_requests": 4 * a.requests,
                        "max_prompt_tokens": 512, "max_tokens_limit": 1024, **VLLM_BENCH}],
            "ingress_num_cpus": 0.25, "max_images_per_request": 1}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.perf_counter()
    serve.run(build_app(args), name="phantom-bench", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    asyncio.run(run_level(url, model, 4, 8, a.max_tokens))  # warm-up: engine start, first batches
    print(f"replica up and warm in {time.perf_counter() - t0:.0f}s", flush=True)
    row = asyncio.run(run_level(url, model, a.clients, a.requests, a.max_tokens))
    print(f"serving: {a.clients} streaming clients, {row['requests']} requests ({row['errors']} errors), "
          f"{row['tokens_per_s']:.1f} tokens/s, ttft p50 {row['ttft_p50_s'] * 1e3:.0f}ms", flush=True)
    if row["first_error"]:
        print(f"  first error: {row['first_error']}", flush=True)
    serve.shutdown()
    ray.shutdown()
    tps, tokens, wall = offline_engine_tokens_per_s(a.preset, a.requests, a.max_tokens)
    print(f"engine offline (LLM.generate, {a.requests} requests at once): {tokens} tokens in {wall:.1f}s, "
          f"{tps:.1f} tokens/s", flush=True)
    print(f"serve pipeline/engine tokens/s: {row['tokens_per_s'] / tps:.2f}")
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="an already running server (default: start one locally)")
    p.add_argument("--models", help="comma-separated model names to load (with --url)")
    p.add_argument("--preset", default="tiny-qwen2")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=48, help="requests per (model, concurrency)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-s", type=float, default=0.01)
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--vs-engine", action="store_true", help="serving (vLLM, --clients streaming clients) "
                   "against the same engine offline; last line: serve pipeline/engine tokens/s")
    p.add_argument("--clients", type=int, default=64)
    a = p.parse_args(argv)
    if a.vs_engine:
        if a.requests < a.clients:
            a.requests = 2 * a.clients
        return vs_engine(a)
    levels = [int(c) for c in a.concurrency.split(",")]

    if a.url:
        url, models = a.url.rstrip("/"), (a.models or a.preset).split(",")
    else:
        url, models = start_local_server(a.preset, free_port(), a.max_batch_size, a.batch_wait_s)

    rows = []
    for model in models:
        asyncio.run(run_level(url, model, 2, 4, a.max_tokens))  # warm-up: first calls, lazy inits
        for c in levels:
            row = asyncio.run(run_level(url, model, c, max(a.requests, c), a.max_tokens))
            rows.append(row)
            print(f"{model:24s} c={c:<3d} n={row['requests']:<4d} err={row['errors']:<3d} "
                  f"rps={row['rps']:7.2f} tok/s={row['tokens_per_s']:8.1f} p50={row['p50_s'] * 1e3:7.0f}ms "
                  f"p99={row['p99_s'] * 1e3:7.0f}ms ttft_p50={row['ttft_p50_s'] * 1e3:6.0f}ms "
                  f"ttft_p99={row['ttft_p99_s'] * 1e3:6.0f}ms", flush=True)
            if row["first_error"]:
                print(f"  first error: {row['first_error']}", flush=True)

    if not a.url:
        from ray import serve

        for model in models:
            stats = serve.get_deployment_handle(f"PhantomModel-{model}", app_name="phantom-bench").stats.remote().result()
            print(f"{model:24s} batches={stats['batches']} mean_batch_size={stats['mean_batch_size']:.2f} "
                  f"max_batch_size={stats['max_batch_size']} mean_ttft={stats['mean_ttft_s'] * 1e3:.0f}ms (in replica)")
    if len(models) == 2 and not a.url:
        top = max(levels)
        on = next(r for r in rows if r["model"] == models[0] and r["concurrency"] == top)
        off = next(r for r in rows if r["model"] == models[1] and r["concurrency"] == top)
        speedup = on["rps"] / off["rps"] if off["rps"] else float("inf")
        p99_ratio = on["p99_s"] / off["p99_s"] if off["p99_s"] else float("inf")
        verdict = "MET" if speedup >= 3 and p99_ratio <= 2 else "NOT MET"
        print(f"\nconcurrency {top}: batching on/off throughput x{speedup:.2f} (target >= 3), "
              f"p99 latency ratio {p99_ratio:.2f} (target <= 2): {verdict}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    if not a.url:
        from ray import serve

        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
