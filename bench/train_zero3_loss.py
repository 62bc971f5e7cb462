"""Peak memory of the training loss under DeepSpeed ZeRO-3: plain (model logits, then the chunked
log-softmax) vs lean (the LM head fused into the chunked log-softmax, ``loss.fused_head``).

The recipe as training runs it (``PhantomRecipe.forward_loss`` + ``engine.backward``), one process,
gloo, ZeRO-3 with every parameter partitioned (``stage3_param_persistence_threshold: 0``: the head
weight is gathered inside its module's forward and backward), fp32 on CPU. The model is
Phantom-0.5B's LLM (hidden 896, Qwen2's vocabulary of 151,655) with ``--layers`` decoder layers and a
one-layer vision tower; the batch is ``--rows`` text-only SFT rows of ``--tokens`` tokens, the last
half of each supervised. Each variant runs in a fresh subprocess and measures the process's peak RSS
during forward + backward (``VmHWM`` reset through ``/proc/self/clear_refs`` after set-up) minus its
RSS before; the loss's figure is that minus the same for the model body alone (forward to the final
hidden states and a free loss on them: gathered weights, activations, gradients). The plain variant holds (rows x tokens x vocab) fp32 logits and their
gradient; the lean one holds ``loss.chunk_tokens`` rows of them at a time.

    python bench/train_zero3_loss.py                 # ~1-2 min on 2 cores; needs ~5 GB free RAM
    python bench/train_zero3_loss.py --rows 1 --tokens 1024

The last line is ``ZeRO-3 loss peak memory plain X.XX GiB, lean Y.YY GiB: Z.Zx``. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(variant: str, args) -> None:
    from phantom_ray.model import PhantomConfig, PhantomForCausalLM
    from phantom_ray.train.config import TrainConfig
    from phantom_ray.train.recipe import PhantomRecipe

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pc = PhantomConfig.from_preset("phantom-0.5b")
    pc.llm_config.num_hidden_layers = args.layers
    pc.vision_config.num_hidden_layers = 1
    model = PhantomForCausalLM(pc, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig.from_dict({
            "data": {"shards": d, "task": "sft", "batch_size": args.rows},
            "loss": {"kind": "sft", "fused_head": variant == "lean", "chunk_tokens": args.chunk},
            "recipe": {"step": 2, "freeze_vision": True},
            "deepspeed": {"zero_stage": 3, "precision": "fp32",
                          "extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
            "run": {"storage_path": d}})
        rec = PhantomRecipe(cfg).setup(1, model=model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 151000, (args.rows, args.tokens), generator=g)
    labels = ids.clone()
    labels[:, : args.tokens // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    rec.engine.train()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    if variant == "body":  # the model's own forward + backward, with a loss that costs nothing
        out = rec.engine(input_ids=ids, attention_mask=batch["attention_mask"], return_hidden=True)
        loss = out.hidden_states.square().mean()
    else:
        loss = rec.forward_loss(batch).loss
    rec.engine.backward(loss)
    peak = _status_kb("VmHWM")
    print(json.dumps({"variant": variant, "peak_bytes": (peak - base) * 1024, "loss": float(loss),
                      "supervised_tokens": int((labels[:, 1:] != -100).sum())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per row (the last half supervised)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None, help="loss chunk (default: the config's loss.chunk_tokens)")
    ap.add_argument("--child", choices=["body", "plain", "lean"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chunk is None:
        from phantom_ray.train.config import LossSection

        args.chunk = LossSection().chunk_tokens
    if args.child:
        child(args.child, args)
        return
    out = {}
    for variant in ("body", "plain", "lean"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--rows", str(args.rows),
               "--tokens", str(args.tokens), "--layers", str(args.layers), "--threads", str(args.threads),
               "--chunk", str(args.chunk)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"{variant} failed:\n{res.stderr[-3000:]}")
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps(out[variant]), flush=True)
    body = out["body"]["peak_bytes"]
    plain, lean = out["plain"]["peak_bytes"] - body, out["lean"]["peak_bytes"] - body
    assert abs(out["plain"]["loss"] - out["lean"]["loss"]) < 1e-3 * abs(out["plain"]["loss"]), out
    print(f"step peak (fwd+bwd) above the model body's {body / 2**30:.2f} GiB: plain "
          f"{out['plain']['peak_bytes'] / 2**30:.2f} GiB, lean {out['lean']['peak_bytes'] / 2**30:.2f} GiB in all")
    print(f"ZeRO-3 loss peak memory ({args.rows} x {args.tokens} tokens, {out['lean']['supervised_tokens']} "
          f"supervised, vocab 151,655, chunk {args.chunk}): plain {plain / 2**30:.2f} GiB, lean {lean / 2**30:.2f} GiB: "
          f"{plain / max(lean, 1):.1f}x")

if __name__ == "__main__":
    main()
