"""TorchEngine dynamic batching on the tiny-qwen2 preset (CPU, one thread): 16 streamed requests with four
different temperatures, one at a time vs concurrently (per-row temperature lets them share one batch).

    PYTHONPATH=. python bench/engine_batching.py

Prints tokens/s and the batch sizes the engine ran; figures only, never pass/fail.
"""

import asyncio
import time
import warnings

import torch

from phantom_ray.infer import Request, SamplingParams, load_engine


def main() -> None:
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # preset weights are random: fine for timing
        engine = load_engine("tiny-qwen2", backend="torch", max_batch_size=16, batch_wait_timeout_s=0.02)
    temps = [0.0, 0.7, 1.0, 1.3]
    reqs = [Request.user(f"question {i} " * (i % 5 + 1), key=str(i),
                         params=SamplingParams(max_tokens=32, ignore_eos=True, temperature=temps[i % 4], seed=i))
            for i in range(16)]

    async def one(r):
        return [e async for e in engine.stream(r)][-1]

    async def sequential():
        return [await one(r) for r in reqs]

    async def concurrent():
        return await asyncio.gather(*(one(r) for r in reqs))

    for name, run in (("one at a time", sequential), ("concurrent", concurrent)):
        n0 = len(engine.batch_sizes)
        t0 = time.perf_counter()
        done = asyncio.run(run())
        dt = time.perf_counter() - t0
        tokens = sum(e.completion_tokens for e in done)
        print(f"{name}: 16 streams (4 temperatures, 32 tokens each): {tokens / dt:.0f} tokens/s, "
              f"batches {engine.batch_sizes[n0:]}")


if __name__ == "__main__":
    main()
