"""Cost of the phantom branch at real layer shapes (CPU, fp32).

Prints, for the 0.5B (Qwen2) and 7B (InternLM2) decoder-layer shapes:
  * one layer forward+backward on a batch of one sequence, phantom on vs off,
  * one cached decode step (one new token) at 1,024 and 4,096 cached tokens, phantom on vs off.
The original implementation measured +19% / +12% for the training step and 3.6x / 2.6x for the
1,024-token decode step (11x at 4,096 for 0.5B), because it recomputed the phantom halves of every
cached key at every step; this implementation caches them.

    python bench/attention.py [--threads 2] [--train-seq 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from phantom_ray.model.attention import build_context
from phantom_ray.model.cache import PhantomCache, PhantomStates
from phantom_ray.model.config import PhantomConfig
from phantom_ray.model.llm import DecoderLayer
from phantom_ray.model.rope import rope_cos_sin


def timeit_pair(fn_a, fn_b, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median times of two functions measured alternately, so machine noise hits both alike."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def make_layer(preset: str):
    cfg = PhantomConfig.from_preset(preset).llm_config
    torch.manual_seed(0)
    layer = DecoderLayer(cfg, 0, eta=1e-4)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return cfg, layer


def train_step(cfg, layer, seq: int, phantom: bool):
    x = torch.randn(1, seq, cfg.hidden_size, requires_grad=True)
    mask = torch.ones(1, seq, dtype=torch.long)
    pos = torch.arange(seq)[None]
    cos, sin = rope_cos_sin(cfg, pos, x.dtype)

    def step():
        ctx = build_context(mask, None, None, "sdpa", use_phantom=phantom)
        layer(x, cos, sin, ctx).sum().backward()

    return step


def decode_step(cfg, layer, cached: int, phantom: bool):
    H, Hk, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    Dk = 2 * D if phantom else D
    cache = PhantomCache(1, initial_capacity=cached + 8)
    cache.update(0, torch.randn(1, Hk, cached, Dk), torch.randn(1, Hk, cached, Dk))
    cache.phantom[0] = PhantomStates(torch.randn(1, 1, H, D), torch.randn(1, 1, Hk, D), torch.randn(1, 1, Hk, D))
    x = torch.randn(1, 1, cfg.hidden_size)
    one = torch.ones(1, 1, dtype=torch.long)
    cos, sin = rope_cos_sin(cfg, torch.tensor([[cached]]), x.dtype)
    full_mask = torch.ones(1, cached, dtype=torch.bool)

    def step():
        cache.length, cache.key_mask = cached, full_mask  # rewind: every step sees `cached` keys
        ctx = build_context(one, cache, None, "sdpa", use_phantom=phantom)
        with torch.no_grad():
            layer(x, cos, sin, ctx)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-repeats", type=int, default=50)
    ap.add_argument("--presets", default="phantom-0.5b,phantom-7b")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, attention kernel sdpa")
    for preset in args.presets.split(","):
        cfg, layer = make_layer(preset)
        seq = args.train_seq if cfg.hidden_size < 2048 else max(64, args.train_seq // 2)
        on, off = timeit_pair(train_step(cfg, layer, seq, True), train_step(cfg, layer, seq, False), args.repeats)
        print(f"{preset:>13} layer fwd+bwd, seq {seq:5d}: phantom {on * 1e3:8.1f} ms  plain {off * 1e3:8.1f} ms  "
              f"ratio {on / off:5.2f}x (+{(on / off - 1) * 100:.0f}%)")
        for cached in (1024, 4096):
            on, off = timeit_pair(decode_step(cfg, layer, cached, True), decode_step(cfg, layer, cached, False),
                                  args.decode_repeats)
            print(f"{preset:>13} decode step, {cached:5d} cached: phantom {on * 1e3:8.3f} ms  plain {off * 1e3:8.3f} ms  "
                  f"ratio {on / off:5.2f}x (+{(on / off - 1) * 100:.0f}%)")


if __name__ == "__main__":
    main()
