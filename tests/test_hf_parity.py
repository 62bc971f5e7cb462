"""Our LLM stacks against transformers' own classes, on the same weights (litgpt's test_against_hf_*).

With the phantom branch off (``model.use_phantom = False``, the original's ``turn_on_phantom``), a
Phantom LLM is exactly its base LLM: the only per-layer difference is the phantom sub-modules of
docs/phantom.md#phantom-dimension. So our Qwen2 and Phi-3 decoders must give the logits of
``Qwen2ForCausalLM`` / ``Phi3ForCausalLM`` built from the same config and weights. transformers has
no InternLM2; it is a Llama with a packed ``wqkv`` (docs/phantom.md#internlm2-packed-wqkv), so it is
compared with ``LlamaForCausalLM`` after unpacking ``wqkv`` into q/k/v.

The comparison runs in float64 with our eager kernel (the reference path; transformers' sdpa), on text-only prompts
(images enter as input embeddings before the first layer, so they do not touch the LLM math), with
and without left padding. Tolerance 1e-10: anything that is not rounding shows up.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

from phantom_ray.model.config import PhantomConfig
from phantom_ray.model.modeling import PhantomForCausalLM

ATOL = 1e-10


def _ours(preset: str, llm_overrides: dict | None = None) -> PhantomForCausalLM:
    cfg = PhantomConfig.from_preset(preset)
    for k, v in (llm_overrides or {}).items():
        setattr(cfg.llm_config, k, v)
    torch.manual_seed(0)
    model = PhantomForCausalLM(cfg, attn_implementation="eager").double().eval()
    # fresh init leaves some tensors at 0/1 (norms, biases); randomise everything so a swapped or
    # ignored weight cannot hide behind a symmetric value
    with torch.no_grad():
        for p in model.language_model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == cfg.llm_config.hidden_size else 0.0))
    model.use_phantom = False
    return model


def _hf_common(llm) -> dict:
    return dict(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_hidden_layers, num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads, rms_norm_eps=llm.rms_norm_eps,
        max_position_embeddings=llm.max_position_embeddings, tie_word_embeddings=False,
        hidden_act="silu", attention_dropout=0.0,
    )


def _load(hf: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    # rotary inv_freq buffers are computed, not loaded
    missing = [k for k in missing if "rotary" not in k]
    assert not missing and not unexpected, (missing, unexpected)


def _hf_model(cls, config) -> torch.nn.Module:
    # sdpa, not eager: transformers' eager softmax runs in float32 even for float64 inputs
    config._attn_implementation = "sdpa"
    return cls(config).double().eval()


def hf_qwen2(ours: PhantomForCausalLM) -> torch.nn.Module:
    llm = ours.config.llm_config
    hf = _hf_model(Qwen2ForCausalLM, Qwen2Config(**_hf_common(llm), rope_theta=llm.rope_theta, use_sliding_window=False))
    sd = {k: v for k, v in ours.language_model.state_dict().items() if "phantom" not in k}
    _load(hf, sd)
    return hf


def hf_phi3(ours: PhantomForCausalLM) -> torch.nn.Module:
    llm = ours.config.llm_config
    rope = None
    if llm.rope_scaling:
        rope = {"rope_type": "longrope", "short_factor": list(llm.rope_scaling["short_factor"]),
                "long_factor": list(llm.rope_scaling["long_factor"])}
    hf_cfg = Phi3Config(**_hf_common(llm), rope_theta=llm.rope_theta, sliding_window=llm.sliding_window,
                        original_max_position_embeddings=llm.original_max_position_embeddings or llm.max_position_embeddings,
                        rope_scaling=rope, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0)
    hf = _hf_model(Phi3ForCausalLM, hf_cfg)
    sd = {k: v for k, v in ours.language_model.state_dict().items() if "phantom" not in k}
    _load(hf, sd)
    return hf


def hf_llama_from_internlm2(ours: PhantomForCausalLM) -> torch.nn.Module:
    """InternLM2 = Llama with renamed modules and a packed wqkv (per kv group: r queries, key, value)."""
    llm = ours.config.llm_config
    rope = None
    if llm.rope_scaling:
        assert llm.rope_scaling["type"] == "dynamic"
        rope = {"rope_type": "dynamic", "factor": float(llm.rope_scaling["factor"])}
    hf = _hf_model(LlamaForCausalLM, LlamaConfig(**_hf_common(llm), rope_theta=llm.rope_theta, rope_scaling=rope,
                                                 attention_bias=llm.attention_bias, mlp_bias=False))
    H, Hk, D = llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim
    r = H // Hk
    sd = {"model.embed_tokens.weight": ours.language_model.model.tok_embeddings.weight,
          "model.norm.weight": ours.language_model.model.norm.weight,
          "lm_head.weight": ours.language_model.output.weight}
    for i, layer in enumerate(ours.language_model.model.layers):
        p = f"model.layers.{i}."
        w = layer.attention.wqkv.weight.view(Hk, r + 2, D, llm.hidden_size)
        sd[p + "self_attn.q_proj.weight"] = w[:, :r].reshape(H * D, -1)
        sd[p + "self_attn.k_proj.weight"] = w[:, -2].reshape(Hk * D, -1)
        sd[p + "self_attn.v_proj.weight"] = w[:, -1].reshape(Hk * D, -1)
        sd[p + "self_attn.o_proj.weight"] = layer.attention.wo.weight
        sd[p + "mlp.gate_proj.weight"] = layer.feed_forward.w1.weight
        sd[p + "mlp.up_proj.weight"] = layer.feed_forward.w3.weight
        sd[p + "mlp.down_proj.weight"] = layer.feed_forward.w2.weight
        sd[p + "input_layernorm.weight"] = layer.attention_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
    _load(hf, sd)
    return hf


def _inputs(vocab: int, B: int = 3, L: int = 12, pad_rows: tuple[int, ...] = (1, 2)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for n, b in enumerate(pad_rows):  # left padding of different lengths
        mask[b, : 2 + 3 * n] = 0
    return ids, mask


def _compare(ours: PhantomForCausalLM, hf: torch.nn.Module, L: int = 12) -> tuple[float, float]:
    """Max |difference| over real tokens of the final (normed) hidden states, in float64.

    Ours runs the left-padded batch; the reference runs each row alone without padding (positions
    from 0), so our padding and position handling is checked too. (transformers' eager path with left
    padding puts NaN at fully masked pad rows, which then leaks into real rows through 0 * NaN.)
    Our head returns float32 logits whatever the weights' dtype (as the original's ``.float()``),
    which would cap a float64 comparison at float32 rounding; the hidden state the head reads is
    compared at 1e-10 and the logits at float32 precision on top. Returns both maxima."""
    ids, mask = _inputs(ours.config.llm_config.vocab_size, L=L)
    seen = {}
    hook = ours.language_model.model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("ours", o))
    hf.model.norm.register_forward_hook(lambda m, i, o: seen.setdefault("hf", []).append(o[0]))
    want = []
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        for row, m in zip(ids, mask):
            # a fresh copy per row: transformers' dynamic RoPE keeps a scaled base from a longer
            # earlier call (the statefulness of docs/phantom.md#d20-internlm2-dynamic-rope)
            want.append(copy.deepcopy(hf)(input_ids=row[m.bool()][None]).logits[0])
    hook.remove()
    real = mask.bool()  # pad positions carry no meaning (docs/phantom.md#d19-pad-positions)
    want_h = torch.cat(seen["hf"])
    assert seen["ours"].dtype == want_h.dtype == torch.float64
    hidden_diff = (seen["ours"][real] - want_h).abs().max().item()
    logits_diff = (got[real] - torch.cat(want).float()).abs().max().item()
    return hidden_diff, logits_diff


def _assert_equal(hidden_diff: float, logits_diff: float) -> None:
    assert hidden_diff < ATOL, f"final hidden states differ by {hidden_diff:.3g} (float64)"
    assert logits_diff < ATOL, f"logits differ by {logits_diff:.3g}"


@pytest.mark.parametrize("preset,build", [("tiny-qwen2", hf_qwen2), ("tiny-internlm2", hf_llama_from_internlm2)])
def test_llm_equals_transformers_with_phantom_off(preset, build):
    ours = _ours(preset, {"rope_scaling": None})
    _assert_equal(*_compare(ours, build(ours)))


def test_phi3_equals_transformers_with_phantom_off():
    ours = _ours("tiny-phi3", {"rope_scaling": None, "original_max_position_embeddings": None})
    _assert_equal(*_compare(ours, hf_phi3(ours)))


@pytest.mark.parametrize("L", [12, 80], ids=["short-factors", "long-factors"])
def test_phi3_longrope_equals_transformers(L):
    """tiny-phi3 has longrope with original_max_position_embeddings 64: a 12-token call uses the
    short factors, an 80-token call the long ones (and the attention scaling of both)."""
    ours = _ours("tiny-phi3")
    assert ours.config.llm_config.rope_scaling["type"] == "longrope"
    _assert_equal(*_compare(ours, hf_phi3(ours), L=L))


@pytest.mark.parametrize("L", [12, 24], ids=["within-max-pos", "ntk-scaled"])
def test_internlm2_dynamic_ntk_equals_transformers_llama(L):
    """InternLM2's dynamic NTK RoPE (tiny-internlm2 has factor 2) against Llama's ``dynamic`` rope;
    max_position_embeddings is lowered to 16 so a 24-token call is past it and the base is rescaled
    (per row, from the row's own length: docs/phantom.md#d20-internlm2-dynamic-rope)."""
    ours = _ours("tiny-internlm2", {"max_position_embeddings": 16})
    _assert_equal(*_compare(ours, hf_llama_from_internlm2(ours), L=L))


def test_phantom_on_differs_from_base():
    """The comparison above can fail: with the phantom branch on (eta 1) the logits move by O(1)."""
    ours = _ours("tiny-qwen2", {"rope_scaling": None})
    hf = hf_qwen2(ours)
    ours.use_phantom = True
    for m in ours.language_model.attention_modules():
        for x in (m.xattn_query_phantom, m.xattn_key_phantom, m.xattn_value_phantom):
            x.eta = 1.0
    hidden_diff, logits_diff = _compare(ours, hf)
    assert hidden_diff > 1e-3 and logits_diff > 1e-3
