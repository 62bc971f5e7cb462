"""Engine benchmark: our torch generation as serving batches it vs vLLM (plain Qwen2) vs vLLM (Phantom).

Workload (fixed seed): 64 requests, prompts of 20-400 random token ids (each starting with the
ChatML template token, the phantom token), max_tokens drawn from {16, 32, 64, 128, 256}, greedy,
no early stop. Weights: Phantom-0.5B widths (hidden 896, 14 heads, 2 KV heads, MLP 4864, vocab
151655) with 4 LLM layers, random init; the plain Qwen2 checkpoint holds the same LLM weights
without the phantom modules (saved by transformers' Qwen2ForCausalLM). The vision tower is shrunk
(text-only workload).

All requests arrive at once (a concurrent burst):
  (a) torch: ``PhantomForCausalLM.generate`` in FIFO batches of 16 (the serving default), the loop
      ``TorchEngine`` runs; a request's first token comes with its batch's first step.
  (b) vLLM, plain Qwen2 checkpoint; (c) vLLM, our Phantom model. Continuous batching; the time of
      first token is taken at the engine step that returns it.

    PYTHONPATH=. flock /tmp/phantom_heavy.lock python bench/engine.py            # CPU, fp32
    PYTHONPATH=. python bench/engine.py --dtype bfloat16                          # GPU

Prints tokens/s and p50/p99 TTFT per engine; the last line is
``phantom-vllm/torch tokens/s ratio: X.XX; phantom-vllm/plain-vllm: Y.YY``.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine core

import numpy as np
import torch

PHANTOM_TOKEN = 151644  # <|im_start|> of the Qwen2 tokenizer (Phantom-0.5B)


def workload(n: int, seed: int, vocab: int):
    rng = np.random.RandomState(seed)
    prompts, max_tokens = [], []
    for _ in range(n):
        L = int(rng.randint(20, 401))
        ids = rng.randint(0, 151000, size=L).tolist()
        prompts.append([PHANTOM_TOKEN] + ids[1:])
        max_tokens.append(int(rng.choice([16, 32, 64, 128, 256])))
    return prompts, max_tokens


def build_models(root: str, layers: int, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from phantom_ray.model.modeling import PhantomForCausalLM

    tiny_vit = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                    image_size=448, patch_size=14)
    from phantom_ray.model.config import InternVisionConfig, PhantomConfig

    cfg = PhantomConfig.from_preset("phantom-0.5b")
    cfg.llm_config.num_hidden_layers = layers
    cfg.vision_config = InternVisionConfig.from_dict(tiny_vit)
    cfg.extra["phantom_token_id"] = PHANTOM_TOKEN  # no tokenizer offline: name the phantom token
    torch.manual_seed(0)
    phantom = PhantomForCausalLM(cfg).eval()
    pdir = os.path.join(root, "phantom")
    phantom.save_pretrained(pdir)
    llm = cfg.llm_config
    qcfg = Qwen2Config(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                       num_hidden_layers=layers, num_attention_heads=llm.num_attention_heads,
                       num_key_value_heads=llm.num_key_value_heads, rms_norm_eps=llm.rms_norm_eps,
                       rope_theta=llm.rope_theta, max_position_embeddings=llm.max_position_embeddings,
                       tie_word_embeddings=False)
    plain = Qwen2ForCausalLM(qcfg)
    sd = {k[len("language_model."):]: v for k, v in phantom.state_dict().items()
          if k.startswith("language_model.") and "_phantom" not in k}
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    if [m for m in missing if "rotary" not in m] or unexpected:
        raise RuntimeError(f"plain Qwen2 weights do not match: missing {missing}, unexpected {unexpected}")
    qdir = os.path.join(root, "plain")
    plain.save_pretrained(qdir)
    del plain
    return phantom.to(dtype), pdir, qdir


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def run_torch(model, prompts, max_tokens, batch: int = 16):
    """All requests queued at t0; FIFO batches of ``batch`` (left padded), each decoded to its longest."""
    t0 = time.monotonic()
    ttft, total = [], 0
    for s in range(0, len(prompts), batch):
        ps, ms = prompts[s:s + batch], max_tokens[s:s + batch]
        L = max(len(p) for p in ps)
        ids = torch.zeros(len(ps), L, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(ps):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        first = []

        def on_step(step, tokens, finished):
            if step == 0:
                first.append(time.monotonic() - t0)

        model.generate(ids, mask, max_new_tokens=max(ms), stop_token_ids=[-1], stream_callback=on_step)
        ttft += first * len(ps)
        total += sum(ms)  # each request's own budget; longer batch mates' extra steps are waste
    wall = time.monotonic() - t0
    return total / wall, ttft, wall


def run_vllm(model_dir, prompts, max_tokens, dtype: str, phantom: bool):
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from phantom_ray.vllm import register

    register()
    on_gpu = torch.cuda.is_available()
    opts = dict(model=model_dir, skip_tokenizer_init=True, dtype=dtype, enforce_eager=not on_gpu, seed=0,
                max_model_len=1024, max_num_seqs=64, enable_prefix_caching=False)
    if not on_gpu:
        opts["kv_cache_memory_bytes"] = 1024 * 2**20
    else:
        opts["gpu_memory_utilization"] = 0.5
    if phantom:
        opts["limit_mm_per_prompt"] = {"image": 0}
    llm = LLM(**opts)
    eng = llm.llm_engine

    def params(m):
        return SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, detokenize=False,
                              output_kind=RequestOutputKind.DELTA)

    llm.generate([{"prompt_token_ids": prompts[0][:32]}], params(4), use_tqdm=False)  # warm-up
    t0 = time.monotonic()
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        eng.add_request(str(i), {"prompt_token_ids": p}, params(m))
    first: dict[str, float] = {}
    total = 0
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.monotonic() - t0
        for o in outs:
            n = len(o.outputs[0].token_ids)
            total += n
            if n and o.request_id not in first:
                first[o.request_id] = now
    wall = time.monotonic() - t0
    del llm, eng
    gc.collect()
    from vllm.distributed import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
    return total / wall, list(first.values()), wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--skip-torch", action="store_true", help="vLLM runs only (the torch figure is then missing)")
    ap.add_argument("--torch-tps", type=float, help="with --skip-torch: a torch tokens/s figure measured before, for the ratio")
    args = ap.parse_args()
    tdtype = getattr(torch, args.dtype)
    prompts, max_tokens = workload(args.requests, args.seed, 151655)
    print(f"workload: {len(prompts)} requests, prompt tokens {sum(map(len, prompts))} "
          f"({min(map(len, prompts))}-{max(map(len, prompts))}), max_tokens total {sum(max_tokens)}; "
          f"threads {torch.get_num_threads()}; dtype {args.dtype}", flush=True)
    root = tempfile.mkdtemp(prefix="phantom-bench-")
    model, pdir, qdir = build_models(root, args.layers, tdtype)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    if not args.skip_torch:
        with torch.inference_mode():
            results["torch"] = run_torch(model.to(dev), prompts, max_tokens)
        print(f"torch (batches of 16): {results['torch'][0]:.1f} tokens/s", flush=True)
    del model
    gc.collect()
    results["plain-vllm"] = run_vllm(qdir, prompts, max_tokens, args.dtype, phantom=False)
    print(f"plain-vllm: {results['plain-vllm'][0]:.1f} tokens/s", flush=True)
    results["phantom-vllm"] = run_vllm(pdir, prompts, max_tokens, args.dtype, phantom=True)
    print(f"{'engine':<14}{'tokens/s':>10}{'wall s':>9}{'TTFT p50 s':>12}{'TTFT p99 s':>12}")
    for name, (tps, ttft, wall) in results.items():
        print(f"{name:<14}{tps:>10.1f}{wall:>9.1f}{pct(ttft, 50):>12.2f}{pct(ttft, 99):>12.2f}")
    ph = results["phantom-vllm"][0]
    torch_tps = results["torch"][0] if "torch" in results else args.torch_tps
    x = ph / torch_tps if torch_tps else float("nan")
    y = ph / results["plain-vllm"][0]
    print(f"phantom-vllm/torch tokens/s ratio: {x:.2f}; phantom-vllm/plain-vllm: {y:.2f}")


if __name__ == "__main__":
    main()
