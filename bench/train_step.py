"""Training-step throughput of one worker (DeepSpeed recipe, one process): tokens/s and MFU.

CPU (default): the tiny-qwen2 preset and a mid-size model (phantom-0.5b shapes cut to 4 LLM and
4 ViT layers), phantom on and off, PO pair batches (one image per pair, encoded once), fp32.
GPU (--device cuda): the full phantom-0.5b in bf16 with flash-attn (sdpa when flash-attn is not
installed), its step time and MFU against the device's bf16 peak.

    python bench/train_step.py                       # CPU: tiny + mid, phantom on/off
    python bench/train_step.py --device cuda --presets phantom-0.5b --steps 10 --json

Random weights and random tokens: the figures are about speed only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phantom_ray.model import PhantomConfig, PhantomForCausalLM  # noqa: E402
from phantom_ray.train.config import TrainConfig  # noqa: E402
from phantom_ray.train.recipe import PhantomRecipe  # noqa: E402


def model_config(name: str) -> PhantomConfig:
    if name == "mid":
        cfg = PhantomConfig.from_preset("phantom-0.5b")
        cfg.llm_config.num_hidden_layers = 4
        cfg.vision_config.num_hidden_layers = 4
        return cfg
    return PhantomConfig.from_preset(name)


def pair_batch(cfg: PhantomConfig, pairs: int, text_len: int, answer_len: int, seed: int = 0) -> dict:
    """2*pairs rows (chosen, then rejected) sharing one single-tile image per pair."""
    g = torch.Generator().manual_seed(seed)
    n_img = cfg.num_image_token
    vocab = cfg.llm_config.vocab_size
    low = max(cfg.image_token_index, cfg.img_end_token_index, cfg.img_start_token_index) + 1
    rows = 2 * pairs
    ids = torch.randint(low, vocab, (rows, 1 + n_img + 1 + text_len), generator=g)
    ids[:, 0] = cfg.img_start_token_index
    ids[:, 1:1 + n_img] = cfg.image_token_index
    ids[:, 1 + n_img] = cfg.img_end_token_index
    ids[pairs:, : -answer_len] = ids[:pairs, : -answer_len]  # same prompt, different answers
    labels = torch.full_like(ids, -100)
    labels[:, -answer_len:] = ids[:, -answer_len:]
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(pairs, 3, size, size, generator=g), "image_repeat": 2,
            "phantom_index": torch.zeros(rows, dtype=torch.long), "sample_id": [str(i) for i in range(pairs)]}


def bench_one(name: str, phantom: bool, device: str, steps: int, pairs: int, text_len: int, attn: str) -> dict:
    mcfg = model_config(name)
    torch.manual_seed(0)
    model = PhantomForCausalLM(mcfg, attn_implementation=attn)
    model.use_phantom = phantom
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_dict({
            "data": {"shards": tmp, "task": "po", "batch_size": pairs},
            "model": {"preset": "tiny-qwen2", "attn_implementation": attn},
            "recipe": {"step": 2}, "optim": {"lr": 1e-5},
            "deepspeed": {"zero_stage": 0, "precision": "auto"}})
        rec = PhantomRecipe(cfg, device=device).setup(steps + 2, model=model)
        batch = pair_batch(mcfg, pairs, text_len, answer_len=8)
        times, toks = [], []
        rec.train_epoch([batch, batch], max_steps=2)  # warm-up
        rec.train_epoch([batch] * steps, on_step=lambda r, m: (times.append(m["step_time_s"]), toks.append(m["tokens"])))
    step_time = statistics.median(times)
    out = {"model": name, "phantom": phantom, "device": device, "params": sum(p.numel() for p in model.parameters()),
           "tokens_per_step": toks[0], "step_time_s": round(step_time, 4),
           "tokens_per_s": round(toks[0] / step_time, 1)}
    if rec.peak:
        out["mfu"] = round(toks[0] * rec.flops_per_token / step_time / rec.peak, 4)
        out["peak_flops"] = rec.peak
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=None, help="comma list (default: tiny-qwen2,mid on CPU; phantom-0.5b on GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=None, help="pairs per step (default 8 CPU tiny, 1 CPU mid, 8 GPU)")
    ap.add_argument("--text-len", type=int, default=None, help="text tokens per row after the image")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phantom", default="on,off")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    presets = (args.presets or ("phantom-0.5b" if gpu else "tiny-qwen2,mid")).split(",")
    attn = "flash" if gpu else "sdpa"
    results = []
    for name in presets:
        pairs = args.pairs or (8 if gpu or name.startswith("tiny") else 1)
        text_len = args.text_len or (256 if gpu else (64 if name.startswith("tiny") else 128))
        for ph in args.phantom.split(","):
            r = bench_one(name, ph == "on", args.device, args.steps, pairs, text_len, attn)
            results.append(r)
            if not args.json:
                print(f"{r['model']:>14} phantom={'on ' if r['phantom'] else 'off'} {r['device']}: "
                      f"{r['tokens_per_s']:>10.1f} tokens/s  step {r['step_time_s']:.3f}s  "
                      f"({r['tokens_per_step']} tokens/step, {r['params'] / 1e6:.1f}M params)"
                      + (f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""), flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
