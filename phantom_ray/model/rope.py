"""Rotary position embeddings for the three LLM families, computed statelessly per call.

* default RoPE (Qwen2, InternLM2, Phi-3 at 4k),
* InternLM2 ``dynamic`` NTK scaling and ``linear`` scaling,
* Phi-3 ``longrope`` (called ``su`` in older configs).

The original InternLM2 code keeps the dynamically scaled base on the module after one long call
(docs/phantom.md#d20-internlm2-dynamic-rope) and Phi-3 picks long/short factors from the longest row of the batch (D21). Here both
choices are made **per row** from that row's own largest position in the call, so a sequence's
rotation never depends on its batch mates (batch-invariant generation needs that). As in every
dynamic-RoPE implementation, a sequence that crosses the switch point during cached decoding keeps
the keys it cached before the switch.
"""

from __future__ import annotations

import math

import torch

from phantom_ray.model.config import LLMConfig


def rope_kind(cfg: LLMConfig) -> str:
    if not cfg.rope_scaling:
        return "default"
    kind = cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type", "default"))
    return "longrope" if kind == "su" else kind


def rope_cos_sin(cfg: LLMConfig, position_ids: torch.Tensor, dtype: torch.dtype,
                 seq_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, L, 1, D) for position ids (B, L).

    ``seq_len`` (B, 1): the length each row's scaling choice is made from (default: the row's largest
    position + 1). vLLM flattens a batch into one row per token and passes each token's own
    sequence length here, so the choice stays per sequence."""
    dim = cfg.head_dim
    device = position_ids.device
    pos = position_ids.to(torch.float32)  # (B, L)
    exponent = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim  # (D/2,)
    base = torch.full((pos.shape[0], 1), float(cfg.rope_theta), device=device)  # (B, 1)
    kind = rope_kind(cfg)
    scale = 1.0
    if seq_len is None:
        seq_len = pos.amax(dim=1, keepdim=True) + 1  # (B, 1): per-row length seen by this call
    seq_len = seq_len.to(device=device, dtype=torch.float32)
    if kind == "dynamic":
        factor = float(cfg.rope_scaling["factor"])
        max_pos = cfg.max_position_embeddings
        scaled = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        base = torch.where(seq_len > max_pos, scaled, base)
    inv_freq = 1.0 / (base ** exponent)  # (B, D/2)
    if kind == "linear":
        pos = pos / float(cfg.rope_scaling["factor"])
    elif kind == "longrope":
        orig = cfg.original_max_position_embeddings or cfg.max_position_embeddings
        short = torch.tensor(cfg.rope_scaling["short_factor"], dtype=torch.float32, device=device)
        long = torch.tensor(cfg.rope_scaling["long_factor"], dtype=torch.float32, device=device)
        if short.numel() != dim // 2 or long.numel() != dim // 2:
            raise ValueError(
                f"llm_config.rope_scaling short/long factors need head_dim/2={dim // 2} entries, "
                f"got {short.numel()}/{long.numel()}"
            )
        ext = torch.where(seq_len > orig, long[None], short[None])  # (B, D/2)
        # same float32 op order as transformers' longrope (1 / (ext * base^x)): tables bit-equal to it
        inv_freq = 1.0 / (ext * base ** exponent)
        ratio = cfg.max_position_embeddings / orig
        if ratio > 1.0:
            scale = math.sqrt(1 + math.log(ratio) / math.log(orig))
        if cfg.rope_scaling.get("attention_factor") is not None:
            scale = float(cfg.rope_scaling["attention_factor"])
    freqs = pos[:, :, None] * inv_freq[:, None, :]  # (B, L, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, L, D)
    cos = (emb.cos() * scale).to(dtype)[:, :, None, :]  # (B, L, 1, D)
    sin = (emb.sin() * scale).to(dtype)[:, :, None, :]
    return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, heads, D); cos/sin (B, L, 1, D)."""
    return x * cos + rotate_half(x) * sin
