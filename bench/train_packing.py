"""Sequence packing and the memory-lean loss, measured on CPU.

1. Throughput of real (non-pad) tokens, packed vs padded. A corpus whose lengths follow a realistic
   multimodal mix: 1-7 tiles of 256 image tokens plus 30-1,500 text tokens per sample (uniform),
   the last third of the text supervised. The LLM is Phantom-0.5B's (hidden 896, MLP 4,864, 14/2
   heads, phantom branch on) with ``--layers`` layers, fp32, one training step (forward + backward +
   the fused head/loss) per batch of ``--samples`` samples, either padded to the longest sample
   (one row each, ``processor.collate``) or packed into rows of ``--max-tokens-per-row``
   (``processor.pack``, block-diagonal attention, per-sample phantom token). Image tokens enter as
   token embeddings: the vision tower's cost is the same in both layouts (same tiles), so it is left
   out; the LM head uses a ``--vocab`` of 8,192 here so that the step is dominated by the layers
   whose work padding wastes (the head runs only on supervised tokens in both layouts).
2. Peak memory of the loss at Qwen2's vocabulary (151,655) and 2,048 supervised tokens: the previous
   implementation (head -> fp32 logits -> log-softmax for the SFT term and again for the sequence
   log-probs) vs the fused chunked one (``phantom_ray.train.loss``), forward + backward from the
   final hidden states, each in a fresh subprocess: peak RSS minus RSS before the loss.

    python bench/train_packing.py                  # ~8-10 min on 2 cores; needs ~6 GB free RAM
    python bench/train_packing.py --samples 8 --layers 2 --skip-throughput

The last line is ``packed/padded real-token throughput: X.XXx; loss peak memory old/new: Y.Yx``.
Timings are figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phantom_ray.model import PhantomConfig, PhantomForCausalLM  # noqa: E402
from phantom_ray.processing.processor import Sample, plan_rows  # noqa: E402
from phantom_ray.train.loss import preference_loss  # noqa: E402


def corpus(n: int, vocab: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img, text = 256 * rng.randint(1, 7), rng.randint(30, 1500)
        L = img + text
        ids = torch.randint(0, vocab, (L,), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        labels = torch.full((L,), -100)
        answer = max(1, text // 3)
        labels[L - answer:] = ids[L - answer:]
        out.append(Sample(input_ids=ids, labels=labels))
    return out


def pad_batch(samples: list[Sample]) -> dict:
    L = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), L, dtype=torch.long)
    mask = torch.zeros(len(samples), L, dtype=torch.long)
    labels = torch.full((len(samples), L), -100)
    for i, s in enumerate(samples):
        ids[i, :len(s)], mask[i, :len(s)], labels[i, :len(s)] = s.input_ids, 1, s.labels
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_batch(samples: list[Sample], budget: int) -> dict:
    rows = plan_rows([len(s) for s in samples], budget)
    L = max(sum(len(samples[i]) for i in r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    labels = torch.full((len(rows), L), -100)
    seg = torch.full((len(rows), L), -1)
    idx = torch.full((len(rows), L), -1)
    pos = torch.zeros(len(rows), L, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for j, i in enumerate(row):
            s, n = samples[i], len(samples[i])
            ids[r, at:at + n], labels[r, at:at + n], seg[r, at:at + n] = s.input_ids, s.labels, j
            idx[r, at:at + n], pos[r, at:at + n] = i, torch.arange(n)
            at += n
    return {"input_ids": ids, "attention_mask": (seg >= 0).long(), "labels": labels, "segment_ids": seg,
            "sample_index": idx, "position_ids": pos, "num_samples": len(samples)}


def step(model, batch: dict, rows_per_micro: int = 4) -> float:
    """One training step over the batch's rows, ``rows_per_micro`` rows per forward/backward
    (gradient accumulation keeps the CPU attention's (rows, heads, L, L) buffers in RAM)."""
    t0 = time.perf_counter()
    packed = "segment_ids" in batch
    R = batch["input_ids"].shape[0]
    for a in range(0, R, rows_per_micro):
        sl = slice(a, a + rows_per_micro)
        kw = {"segment_ids": batch["segment_ids"][sl], "position_ids": batch["position_ids"][sl]} if packed else {}
        out = model(batch["input_ids"][sl], batch["attention_mask"][sl], return_hidden=True, **kw)
        loss = preference_loss(None, batch["labels"][sl], kind="sft", hidden=out.hidden_states,
                               head_weight=model.language_model.head.weight,
                               sample_index=batch["sample_index"][sl] if packed else None,
                               num_samples=batch.get("num_samples"))
        loss.loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def throughput(args) -> dict:
    torch.manual_seed(0)
    cfg = PhantomConfig.from_preset("phantom-0.5b")
    cfg.llm_config.num_hidden_layers = args.layers
    cfg.llm_config.vocab_size = args.vocab
    cfg.vision_config.num_hidden_layers = 1  # unused (image tokens come in as embeddings)
    model = PhantomForCausalLM(cfg, attn_implementation="sdpa").train()
    samples = corpus(args.samples, args.vocab, seed=1)
    real = sum(len(s) for s in samples)
    padded, packed = pad_batch(samples), pack_batch(samples, args.max_tokens_per_row)
    step(model, pack_batch(corpus(2, args.vocab, seed=9), 512))  # warm-up (allocator, kernels)
    res = {"samples": len(samples), "real_tokens": real,
           "padded_slots": padded["input_ids"].numel(), "packed_slots": packed["input_ids"].numel(),
           "padded_rows": padded["input_ids"].shape[0], "packed_rows": packed["input_ids"].shape[0]}
    for name, batch in (("padded", padded), ("packed", packed)):
        times = [step(model, batch, args.rows_per_micro) for _ in range(args.repeats)]
        res[f"{name}_s"] = min(times)
        res[f"{name}_real_tokens_per_s"] = real / min(times)
    res["ratio"] = res["packed_real_tokens_per_s"] / res["padded_real_tokens_per_s"]
    return res


# ---- loss memory (each variant in its own process) ----------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _old_loss(hidden, weight, labels):
    """The previous implementation: the head's fp32 logits, then a full log-softmax for the SFT
    cross-entropy and another for the per-sequence log-probs."""
    import torch.nn.functional as F

    logits = (hidden @ weight.t()).float()
    lf = logits[:, :-1].float()
    tgt = labels[:, 1:]
    sft = F.cross_entropy(lf.reshape(-1, lf.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    mask = tgt != -100
    lp = torch.gather(lf.log_softmax(-1), 2, tgt.masked_fill(~mask, 0)[..., None]).squeeze(-1) * mask
    return sft - 0.0 * lp.sum()  # the sequence log-probs feed the preference term (kept in the graph)


def loss_memory_child(variant: str, tokens: int, vocab: int, hidden_size: int, chunk: int) -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(1, tokens, hidden_size, generator=g) * 0.1).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    labels[0, 0] = -100
    weight.grad = torch.zeros_like(weight)  # the head's gradient buffer exists in both cases (not counted)
    base = _rss_bytes()
    if variant == "old":
        loss = _old_loss(hidden, weight, labels)
    else:
        loss = preference_loss(None, labels, kind="sft", hidden=hidden, head_weight=weight, chunk=chunk).loss
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": variant, "peak_bytes": peak - base, "loss": float(loss)}))


def loss_memory(args) -> dict:
    out = {}
    for variant in ("old", "new"):
        cmd = [sys.executable, os.path.abspath(__file__), "--loss-child", variant, "--chunk", str(args.chunk)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16, help="samples per batch (the 0.5B config's batch_size)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-tokens-per-row", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rows-per-micro", type=int, default=4, help="rows per forward/backward (accumulated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None, help="loss chunk (default: the config's loss.chunk_tokens)")
    ap.add_argument("--loss-child", choices=["old", "new"], help=argparse.SUPPRESS)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    if args.chunk is None:
        from phantom_ray.train.config import LossSection

        args.chunk = LossSection().chunk_tokens
    if args.loss_child:
        loss_memory_child(args.loss_child, 2048, 151655, 896, args.chunk)
        return
    torch.set_num_threads(args.threads)
    mem = loss_memory(args)
    old, new = mem["old"]["peak_bytes"], mem["new"]["peak_bytes"]
    print(f"loss at vocab 151,655 x 2,048 tokens (fwd+bwd, chunk {args.chunk}): old peak {old / 2**30:.2f} GiB, "
          f"new peak {new / 2**30:.2f} GiB (losses {mem['old']['loss']:.4f} / {mem['new']['loss']:.4f})", flush=True)
    ratio = float("nan")
    if not args.skip_throughput:
        r = throughput(args)
        print(f"{r['samples']} samples, {r['real_tokens']} real tokens: padded {r['padded_rows']} rows "
              f"({r['padded_slots']} slots, {r['padded_s']:.1f} s, {r['padded_real_tokens_per_s']:.0f} real tok/s); "
              f"packed {r['packed_rows']} rows of <= {args.max_tokens_per_row} ({r['packed_slots']} slots, "
              f"{r['packed_s']:.1f} s, {r['packed_real_tokens_per_s']:.0f} real tok/s)", flush=True)
        ratio = r["ratio"]
    print(f"packed/padded real-token throughput: {ratio:.2f}x; loss peak memory old/new: {old / max(new, 1):.1f}x")


if __name__ == "__main__":
    main()
