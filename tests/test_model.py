"""Model core: phantom attention against an independent reference, kernels, cache, generation,
checkpoint keys and parameter counts, save/load (local and S3)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from phantom_ray.model import PhantomConfig, PhantomForCausalLM
from phantom_ray.model.attention import build_context, phantom_attention

TINY = ["tiny-qwen2", "tiny-internlm2", "tiny-phi3"]


def make_model(preset, eta=1.0, attn="eager", seed=0):
    torch.manual_seed(seed)
    model = PhantomForCausalLM(PhantomConfig.from_preset(preset, phantom_eta=eta), attn_implementation=attn)
    # random O(1) phantom weights so a wrong phantom branch moves the outputs by O(1) (docs/phantom.md#near-identity)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_phantom" in name:
                p.normal_(0, 0.5)
    return model.eval()


def batch_inputs(model, lengths, seed=1, tiles=None):
    """Left-padded batch of random prompts; row i has ``tiles[i]`` image tiles (default 1)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    K = cfg.num_image_token
    tiles = tiles or [1] * len(lengths)
    rows = []
    for n, t in zip(lengths, tiles):
        text = torch.randint(20, cfg.llm_config.vocab_size, (n,), generator=g).tolist()
        img = [cfg.img_start_token_index] + [cfg.image_token_index] * (K * t) + [cfg.img_end_token_index]
        rows.append(text[:2] + (img if t else []) + text[2:])
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    n_tiles = sum(tiles)
    pv = torch.randn(n_tiles, 3, cfg.image_size, cfg.image_size, generator=g) if n_tiles else None
    return ids, mask, pv


# ---------------------------------------------------------------------------------------------------
# Independent plain-torch reference of docs/phantom.md#phantom-dimension (phantom after repeat_kv, exp-ratio gate,
# per-row Python gather of the first real token, dense masked softmax attention).
# ---------------------------------------------------------------------------------------------------
def ref_xattn(x, phantom, xa, residual, eta):
    D = x.shape[-1]
    Q = F.gelu(x @ xa.linear_q.weight.T)  # (B, L, G, D)
    K = F.gelu(phantom @ xa.linear_k.weight.T)  # (B, 1, G, D)
    V = F.gelu(phantom @ xa.linear_v.weight.T)
    S = torch.einsum("blhd,bgd->blhg", Q, K[:, 0]) / math.sqrt(D)
    Y = torch.einsum("blhg,bgd->blhd", S.softmax(-1), V[:, 0])
    Z = F.gelu(Y @ xa.linear_o.weight.T)
    return x + eta * Z if residual else eta * Z


def ref_phantom_attention(mod, q, k, v, mask, eta):
    B, L, H, D = q.shape
    r = H // k.shape[2]
    k, v = k.repeat_interleave(r, dim=2), v.repeat_interleave(r, dim=2)  # repeat_kv
    pos = [int(torch.nonzero(mask[b])[0]) for b in range(B)]
    q_phi = torch.stack([q[b, pos[b]] for b in range(B)])[:, None]
    k_phi = torch.stack([k[b, pos[b]] for b in range(B)])[:, None]
    v_phi = torch.stack([v[b, pos[b]] for b in range(B)])[:, None]
    q2 = torch.cat([q, ref_xattn(q, q_phi, mod.xattn_query_phantom, False, eta)], -1)
    k2 = torch.cat([k, ref_xattn(k, k_phi, mod.xattn_key_phantom, False, eta)], -1)
    v2 = torch.cat([v, ref_xattn(v, v_phi, mod.xattn_value_phantom, True, eta)], -1)
    scores = torch.einsum("blhd,bthd->bhlt", q2, k2) / math.sqrt(D)
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    allowed = allowed | torch.eye(L, dtype=torch.bool)  # keep padding rows finite (their values are unused)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhlt,bthd->blhd", scores.softmax(-1), v2)
    o1, o2 = out[..., :D], out[..., D:]
    w1 = o1 @ mod.gating_phantom_1.weight.T + mod.gating_phantom_1.bias
    w2 = o2 @ mod.gating_phantom_2.weight.T + mod.gating_phantom_2.bias
    gate = torch.exp(w1) / (torch.exp(w1) + torch.exp(w2))
    return gate * o1 + (1 - gate) * o2


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_phantom_attention_matches_reference(preset, attn):
    model = make_model(preset, attn=attn).double()
    mod = model.language_model.attention_modules()[0]
    cfg = model.config.llm_config
    B, L, D = 3, 9, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, cfg.num_attention_heads, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, L, cfg.num_key_value_heads, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, L, cfg.num_key_value_heads, D, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0
    ctx = build_context(mask, None, None, attn)
    ours = phantom_attention(mod, 0, q, k, v, ctx)
    ref = ref_phantom_attention(mod, q, k, v, mask, eta=1.0)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-9, rtol=1e-7)
    # gradients wrt inputs and every phantom parameter (real positions only carry meaning: docs/phantom.md#d19-pad-positions)
    w = torch.randn(ours.shape, generator=g, dtype=torch.float64) * real[..., None, None]
    params = [p for n, p in mod.named_parameters() if "_phantom" in n]
    g_ours = torch.autograd.grad((ours * w).sum(), [q, k, v, *params])
    g_ref = torch.autograd.grad((ref * w).sum(), [q, k, v, *params])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-6)
    # and the reference really depends on the phantom branch: switching it off changes the output
    ctx_off = build_context(mask, None, None, attn, use_phantom=False)
    plain = phantom_attention(mod, 0, q, k, v, ctx_off)
    assert (plain[real] - ref[real]).abs().max() > 1e-2


def test_internlm2_packed_wqkv_layout():
    model = make_model("tiny-internlm2")
    mod = model.language_model.attention_modules()[0]
    H, Hk, D = mod.num_heads, mod.num_kv_heads, mod.head_dim
    r = H // Hk
    x = torch.randn(1, 2, model.config.llm_config.hidden_size)
    q, k, v = mod.project(x)
    W = mod.wqkv.weight.view(Hk, r + 2, D, -1)  # per kv group: r query heads, key, value
    for g in range(Hk):
        for s in range(r):
            torch.testing.assert_close(q[0, :, g * r + s], x[0] @ W[g, s].T)
        torch.testing.assert_close(k[0, :, g], x[0] @ W[g, r].T)
        torch.testing.assert_close(v[0, :, g], x[0] @ W[g, r + 1].T)


@pytest.mark.parametrize("preset", TINY)
def test_fresh_phantom_is_near_identity(preset):
    torch.manual_seed(0)
    model = PhantomForCausalLM.from_preset(preset, attn_implementation="eager").eval()  # eta 1e-4, HF init
    ids, mask, pv = batch_inputs(model, [7, 11])
    with torch.no_grad():
        on = model(ids, mask, pv).logits
        model.use_phantom = False
        off = model(ids, mask, pv).logits
    real = mask.bool()
    assert (on[real] - off[real]).abs().max() < 1e-3
    # the same comparison at eta = 1 shows a clear effect, so the check above can fail
    model = make_model(preset)
    with torch.no_grad():
        on = model(ids, mask, pv).logits
        model.use_phantom = False
        off = model(ids, mask, pv).logits
    assert (on[real] - off[real]).abs().max() > 1e-2


@pytest.mark.parametrize("preset", TINY)
def test_eager_and_sdpa_agree_forward_and_backward(preset):
    model = make_model(preset).train()
    ids, mask, pv = batch_inputs(model, [9, 5, 12], tiles=[1, 0, 2])
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    results = {}
    for attn in ("eager", "sdpa"):
        model.zero_grad()
        model.set_attn_implementation(attn)
        out = model(ids, mask, pv, labels=labels)
        out.loss.backward()
        results[attn] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    real = mask.bool()
    torch.testing.assert_close(results["eager"][0][real], results["sdpa"][0][real], atol=2e-5, rtol=1e-4)
    assert results["eager"][1].keys() == results["sdpa"][1].keys()
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(grad, results["sdpa"][1][name], atol=2e-5, rtol=2e-3, msg=name)


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_decode_matches_full_recompute(preset, attn):
    model = make_model(preset, attn=attn)
    ids, mask, pv = batch_inputs(model, [6, 10, 3], tiles=[1, 2, 0])
    steps = 6
    g = torch.Generator().manual_seed(5)
    new = torch.randint(20, model.config.llm_config.vocab_size, (ids.shape[0], steps), generator=g)
    with torch.no_grad():
        cache = model.new_cache(capacity=4)  # small: exercises buffer growth
        out = model(ids, mask, pv, cache=cache)
        inc = [out.logits[:, -1]]
        full_mask = mask
        for t in range(steps):
            full_mask = torch.cat([full_mask, torch.ones_like(mask[:, :1])], 1)
            inc.append(model(new[:, t : t + 1], full_mask, cache=cache).logits[:, -1])
        for t in range(steps + 1):
            ids_t = torch.cat([ids, new[:, :t]], 1)
            m_t = torch.cat([mask, torch.ones_like(new[:, :t])], 1)
            full = model(ids_t, m_t, pv).logits[:, -1]
            torch.testing.assert_close(inc[t], full, atol=1e-4, rtol=1e-4, msg=f"step {t}")


@pytest.mark.parametrize("preset", TINY)
def test_batched_greedy_generation_equals_single(preset):
    model = make_model(preset, attn="sdpa")
    ids, mask, pv = batch_inputs(model, [4, 11, 7], tiles=[1, 0, 2])
    kw = dict(max_new_tokens=8, stop_token_ids=[-1])
    batched = model.generate(ids, mask, pv, **kw)
    tile_off = [0, 1, 1, 3]
    for i in range(ids.shape[0]):
        real = mask[i].bool()
        pv_i = pv[tile_off[i] : tile_off[i + 1]] if tile_off[i + 1] > tile_off[i] else None
        single = model.generate(ids[i : i + 1, real], None, pv_i, **kw)
        assert single.sequences[0].tolist() == batched.sequences[i].tolist()
    # right padding is accepted too (re-aligned to the left internally)
    right_ids = torch.zeros_like(ids)
    right_mask = torch.zeros_like(mask)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        right_ids[i, :n] = ids[i, mask[i].bool()]
        right_mask[i, :n] = 1
    assert model.generate(right_ids, right_mask, pv, **kw).sequences.tolist() == batched.sequences.tolist()


def test_interleaved_requests_share_one_model():
    model = make_model("tiny-qwen2", attn="sdpa")
    a_ids, a_mask, a_pv = batch_inputs(model, [5, 9], seed=11)
    b_ids, b_mask, b_pv = batch_inputs(model, [13], seed=12, tiles=[2])

    def run_alone(ids, mask, pv, n=6):
        return model.generate(ids, mask, pv, max_new_tokens=n, stop_token_ids=[-1]).sequences

    def step_all(reqs, n=6):
        caches, outs, toks = {}, {}, {k: [] for k in reqs}
        for k, (ids, mask, pv) in reqs.items():  # prefill both, then alternate decode steps
            caches[k] = model.new_cache()
            outs[k] = model(ids, mask, pv, cache=caches[k], logits_to_keep=1).logits[:, -1]
        for _ in range(n):
            for k in reqs:
                t = outs[k].argmax(-1)
                toks[k].append(t)
                outs[k] = model(t[:, None], cache=caches[k], logits_to_keep=1).logits[:, -1]
        return {k: torch.stack(v, 1) for k, v in toks.items()}

    with torch.no_grad():
        inter = step_all({"a": (a_ids, a_mask, a_pv), "b": (b_ids, b_mask, b_pv)})
    assert inter["a"].tolist() == run_alone(a_ids, a_mask, a_pv).tolist()
    assert inter["b"].tolist() == run_alone(b_ids, b_mask, b_pv).tolist()


def test_sampling_is_reproducible_per_row_seed():
    model = make_model("tiny-phi3", attn="sdpa")
    ids, mask, pv = batch_inputs(model, [6, 9])
    kw = dict(max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.9, top_k=50, stop_token_ids=[-1])
    gens = lambda: [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]  # noqa: E731
    a = model.generate(ids, mask, pv, generator=gens(), **kw).sequences
    b = model.generate(ids, mask, pv, generator=gens(), **kw).sequences
    assert a.tolist() == b.tolist()
    # row 1 alone with its seed gives the same tokens as inside the batch
    alone = model.generate(ids[1:, mask[1].bool()], None, pv[1:], generator=[torch.Generator().manual_seed(2)], **kw)
    assert alone.sequences[0].tolist() == a[1].tolist()


def test_stop_tokens_and_stream_callback():
    model = make_model("tiny-qwen2", attn="sdpa")
    ids, mask, pv = batch_inputs(model, [6, 9])
    free = model.generate(ids, mask, pv, max_new_tokens=6, stop_token_ids=[-1])
    stop = int(free.sequences[0, 2])  # make row 0 stop at its third token
    seen = []
    out = model.generate(ids, mask, pv, max_new_tokens=6, stop_token_ids=[stop], pad_token_id=0,
                         stream_callback=lambda step, tok, fin: seen.append((tok.clone(), fin.clone())))
    assert out.finish_reasons[0] == "stop" and out.lengths[0] == 3
    assert out.sequences[0, :3].tolist() == free.sequences[0, :3].tolist()
    assert set(out.sequences[0, 3:].tolist()) <= {0}
    assert len(seen) == out.sequences.shape[1]
    assert torch.stack([s[0] for s in seen], 1).tolist() == out.sequences.tolist()


def test_image_token_count_mismatch_names_both_counts():
    model = make_model("tiny-qwen2")
    ids, mask, pv = batch_inputs(model, [6], tiles=[2])
    with pytest.raises(ValueError, match=r"8 <IMG_CONTEXT> tokens .* 4 features"):
        model(ids, mask, pv[:1])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids, mask)


def test_image_repeat_reuses_features_for_pair_rows():
    model = make_model("tiny-internlm2")
    ids, mask, pv = batch_inputs(model, [6, 8], tiles=[1, 2])
    both_ids, both_mask = torch.cat([ids, ids]), torch.cat([mask, mask])
    with torch.no_grad():
        rep = model(both_ids, both_mask, pv, image_repeat=2).logits
        twice = model(both_ids, both_mask, torch.cat([pv, pv])).logits
    torch.testing.assert_close(rep, twice)


def test_pixel_shuffle_matches_spec_formula():
    from phantom_ray.model.vision import pixel_shuffle

    x = torch.randn(2, 8, 8, 3)
    out = pixel_shuffle(x)
    for i in range(4):
        for j in range(4):
            expect = torch.cat([x[:, 2 * i, 2 * j], x[:, 2 * i, 2 * j + 1], x[:, 2 * i + 1, 2 * j], x[:, 2 * i + 1, 2 * j + 1]], -1)
            torch.testing.assert_close(out[:, i, j], expect)


# ---------------------------------------------------------------------------------------------------
# Real presets on the meta device: checkpoint keys (docs/phantom.md#checkpoint-keys) and parameter counts
# ---------------------------------------------------------------------------------------------------
def spec_keys(preset: str) -> set[str]:
    cfg = PhantomConfig.from_preset(preset)
    keys = {"vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.patch_embedding.bias", "vision_model.embeddings.position_embedding"}
    for i in range(24):
        for s in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight",
                  "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "norm1.weight", "norm1.bias", "norm2.weight",
                  "norm2.bias", "ls1", "ls2"):
            keys.add(f"vision_model.encoder.layers.{i}.{s}")
    keys |= {f"vision_proj.{i}.{w}" for i in (0, 1, 3) for w in ("weight", "bias")}
    fam = cfg.family
    phantom = [f"xattn_{b}_phantom.linear_{x}.weight" for b in ("query", "key", "value") for x in "qkvo"]
    phantom += [f"gating_phantom_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")]
    lm = "language_model.model"
    if fam == "qwen2":
        keys |= {f"{lm}.embed_tokens.weight", f"{lm}.norm.weight", "language_model.lm_head.weight"}
        per = [f"self_attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj") for w in ("weight", "bias")]
        per += ["self_attn.o_proj.weight"] + [f"self_attn.{p}" for p in phantom]
        per += [f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
        per += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    elif fam == "internlm2":
        keys |= {f"{lm}.tok_embeddings.weight", f"{lm}.norm.weight", "language_model.output.weight"}
        per = ["attention.wqkv.weight", "attention.wo.weight"] + [f"attention.{p}" for p in phantom]
        per += [f"feed_forward.{w}.weight" for w in ("w1", "w2", "w3")] + ["attention_norm.weight", "ffn_norm.weight"]
    else:
        keys |= {f"{lm}.embed_tokens.weight", f"{lm}.norm.weight", "language_model.lm_head.weight"}
        per = ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight"] + [f"self_attn.{p}" for p in phantom]
        per += ["mlp.gate_up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                "post_attention_layernorm.weight"]
    for i in range(cfg.llm_config.num_hidden_layers):
        keys |= {f"{lm}.layers.{i}.{p}" for p in per}
    return keys


@pytest.mark.parametrize("preset,expected", [("phantom-0.5b", 0.94e9), ("phantom-1.8b", 2.21e9),
                                             ("phantom-3.8b", 4.15e9), ("phantom-7b", 8.08e9)])
def test_real_presets_keys_and_parameter_counts(preset, expected):
    from phantom_ray.model.info import build_meta, parameter_counts

    model = build_meta(PhantomConfig.from_preset(preset))
    assert set(model.state_dict().keys()) == spec_keys(preset)
    D = model.config.llm_config.head_dim
    sd = model.state_dict()
    name = next(k for k in sd if k.endswith("xattn_query_phantom.linear_q.weight"))
    assert tuple(sd[name].shape) == (D, D)
    total = parameter_counts(preset)["total"]
    print(f"{preset}: {total / 1e9:.3f}B parameters")
    assert abs(total - expected) / expected < 0.01


# ---------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", TINY)
def test_save_load_round_trip_local(tmp_path, preset):
    model = make_model(preset)
    ids, mask, pv = batch_inputs(model, [5, 8])
    model.save_pretrained(str(tmp_path / "ckpt"), max_shard_bytes=200_000)  # forces several shards
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    loaded = PhantomForCausalLM.from_pretrained(str(tmp_path / "ckpt"), attn_implementation="eager", phantom_eta=1.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, pv).logits, model(ids, mask, pv).logits, atol=0, rtol=0)


def test_save_load_round_trip_s3(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("PHANTOM_RAY_CACHE", str(tmp_path / "cache"))
    model = make_model("tiny-qwen2")
    ids, mask, pv = batch_inputs(model, [5, 8])
    uri = f"{s3_bucket}/models/tiny"
    model.save_pretrained(uri)
    loaded = PhantomForCausalLM.from_pretrained(uri, attn_implementation="eager", phantom_eta=1.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, pv).logits, model(ids, mask, pv).logits, atol=0, rtol=0)
    bf16 = PhantomForCausalLM.from_pretrained(uri, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16


def test_load_reports_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model("tiny-internlm2")
    model.save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd.pop("language_model.output.weight")
    sd["language_model.model.layers.0.attention.bogus.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1: language_model\.output\.weight.*unexpected 1: .*bogus"):
        PhantomForCausalLM.from_pretrained(str(tmp_path))


def test_load_remaps_internvl_projector_name(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model("tiny-qwen2")
    model.save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd = {("mlp1." + k[len("vision_proj."):] if k.startswith("vision_proj.") else k): v for k, v in sd.items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    loaded = PhantomForCausalLM.from_pretrained(str(tmp_path))
    torch.testing.assert_close(loaded.vision_proj[1].weight, model.vision_proj[1].weight)


def test_model_import_works_without_ray_and_deepspeed():
    code = (
        "import sys\n"
        "for m in ('ray', 'deepspeed', 'flash_attn'):\n"
        "    sys.modules[m] = None  # any import of them raises ImportError\n"
        "import phantom_ray.model as pm\n"
        "m = pm.PhantomForCausalLM.from_preset('tiny-qwen2')\n"
        "print(sorted(pm.list_presets()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "phantom-7b" in res.stdout


def test_model_info_cli_prints_counts():
    from phantom_ray.cli import main

    res = subprocess.run([sys.executable, "-m", "phantom_ray.cli", "model", "info", "phantom-0.5b", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    import json

    info = json.loads(res.stdout)
    assert info["family"] == "qwen2" and abs(info["total"] - 0.94e9) / 0.94e9 < 0.01
    assert info["phantom"] == 24 * (12 * 64 * 64 + 2 * 65)
    assert callable(main)
