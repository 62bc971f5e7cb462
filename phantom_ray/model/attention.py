"""Phantom Dimension (arXiv 2409.14713; docs/phantom.md#phantom-dimension) written once around a selectable kernel.

Per attention layer the phantom branch widens every head from D to 2D:

    q' = [q, q*],  k' = [k, k*],  v' = [v, v*]          (concatenated along head_dim)
    q* = XAttn_q(q, q_phi),  k* = XAttn_k(k, k_phi),  v* = v + eta * XAttn_v(v, v_phi)

where q_phi, k_phi, v_phi are the states of the sequence's first real token and XAttn is a
cross-*head* attention of every token's head vectors over the phantom token's heads (docs/phantom.md#xattention).
Causal attention runs on the widened heads with the ORIGINAL scale 1/sqrt(D); the output halves are
mixed by a gate g = sigmoid(w1 - w2) computed in fp32 (docs/phantom.md#d8-gate-numerics).

k* and v* are computed at key/value-head granularity (Hk heads) for every family; docs/phantom.md#gqa shows
this equals computing them after repeat_kv, and it is cheaper.

Kernels (``eager`` is the reference the others are tested against):
* ``eager``: explicit softmax(q k^T) v in fp32,
* ``sdpa``: torch.nn.functional.scaled_dot_product_attention,
* ``flash``: flash-attn varlen (CUDA, fp16/bf16); falls back to sdpa with a warning when flash-attn
  is missing or the tensors are not on a GPU in half precision.
GQA is handled by folding the r query heads of a group into the query-length axis, so the KV cache
is never repeated in memory.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phantom_ray.model.cache import PhantomCache, PhantomStates

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash")


@functools.lru_cache(maxsize=None)
def is_flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    logger.warning(msg)


def resolve_attn_implementation(name: str | None) -> str:
    name = {"flash_attention_2": "flash", None: "sdpa"}.get(name, name)
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
    if name == "flash" and not is_flash_attn_available():
        _warn_once("flash-attn is not installed or no CUDA device is present: using sdpa attention instead")
        return "sdpa"
    return name


# ------------------------------------------------------------------------------------------------
# Per-forward context (built once by the model, shared by all layers; never stored on modules)
# ------------------------------------------------------------------------------------------------
@dataclass
class AttnContext:
    """What every layer needs to know about the current forward call."""

    query_mask: torch.Tensor  # (B, L) bool, real tokens of this call
    key_mask: torch.Tensor  # (B, T) bool, real keys including the cache
    allowed: torch.Tensor | None  # (B, 1, L, T) bool attention mask, None = plain causal / all keys
    is_causal: bool  # use the kernel's own causal mask (no padding, no cache)
    past_length: int
    phantom_local_index: torch.Tensor | None  # (B,) index in this call of the phantom token, or None
    cache: PhantomCache | None = None
    attn_implementation: str = "sdpa"
    use_phantom: bool = True
    packed: "PackedSegments | None" = None  # several samples per row (training); None: one per row


@dataclass
class PackedSegments:
    """Sample boundaries of a packed batch: several samples share a row, each attends only to
    itself and has its own phantom token (its first token), positions restart per sample."""

    segment_ids: torch.Tensor  # (B, L) long: sample number within the row, -1 on padding
    phantom_pos: torch.Tensor  # (B, L) long: position in the row of each token's phantom token
    segment_of: torch.Tensor  # (B, L) long: global sample number (0..S-1, row-major), pads -> previous
    starts: tuple[torch.Tensor, torch.Tensor]  # (rows (S,), positions (S,)) of each sample's first token
    cu_seqlens: torch.Tensor | None = None  # (S+1,) int32 for flash-attn varlen
    max_seqlen: int = 0
    token_index: torch.Tensor | None = None  # flat indices of the real tokens (flash)


def packed_segments(segment_ids: torch.Tensor, for_flash: bool = False) -> PackedSegments:
    B, L = segment_ids.shape
    seg = segment_ids.long()
    real = seg >= 0
    prev = F.pad(seg[:, :-1], (1, 0), value=-1)
    is_start = real & (seg != prev)  # samples are contiguous runs of one id
    pos = torch.arange(L, device=seg.device).expand(B, L)
    phantom_pos = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(dim=1).values
    segment_of = (is_start.flatten().long().cumsum(0) - 1).clamp(min=0).view(B, L)
    out = PackedSegments(seg, phantom_pos, segment_of, is_start.nonzero(as_tuple=True))
    if for_flash:
        counts = torch.bincount(segment_of[real], minlength=int(is_start.sum()))
        out.cu_seqlens = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        out.max_seqlen = int(counts.max()) if counts.numel() else 0
        out.token_index = real.flatten().nonzero().squeeze(1)
    return out


def build_packed_context(segment_ids: torch.Tensor, attn_implementation: str, sliding_window: int | None = None,
                         use_phantom: bool = True) -> AttnContext:
    """Context of a packed training forward (no cache): causal attention within each sample only
    (a block-diagonal mask for eager/sdpa; cu_seqlens for flash-attn varlen)."""
    B, L = segment_ids.shape
    packed = packed_segments(segment_ids, for_flash=attn_implementation == "flash")
    real = packed.segment_ids >= 0
    allowed = None
    if attn_implementation != "flash":
        idx = torch.arange(L, device=segment_ids.device)
        causal = idx[None, :] <= idx[:, None]
        if sliding_window is not None and L > sliding_window:
            causal = causal & (idx[:, None] - idx[None, :] <= sliding_window)
        seg = packed.segment_ids
        allowed = causal[None] & (seg[:, :, None] == seg[:, None, :]) & real[:, None, :]
        allowed = (allowed | torch.eye(L, dtype=torch.bool, device=seg.device)[None])[:, None]  # pads see themselves
    return AttnContext(query_mask=real, key_mask=real, allowed=allowed, is_causal=False, past_length=0,
                       phantom_local_index=None, cache=None, attn_implementation=attn_implementation,
                       use_phantom=use_phantom, packed=packed)


def build_context(
    query_mask: torch.Tensor,
    cache: PhantomCache | None,
    phantom_index: torch.Tensor | None,
    attn_implementation: str,
    sliding_window: int | None = None,
    use_phantom: bool = True,
) -> AttnContext:
    B, L = query_mask.shape
    past = cache.length if cache is not None else 0
    key_mask = cache.pending_mask(query_mask) if cache is not None else query_mask.bool()
    T = key_mask.shape[1]
    padded = not bool(key_mask.all())
    window_binds = sliding_window is not None and T > sliding_window
    allowed = None
    is_causal = False
    if padded or window_binds or (past and L > 1):
        q_idx = torch.arange(past, past + L, device=query_mask.device)[:, None]  # (L, 1)
        k_idx = torch.arange(T, device=query_mask.device)[None, :]  # (1, T)
        causal = k_idx <= q_idx
        if window_binds:
            causal = causal & (q_idx - k_idx <= sliding_window)
        allowed = causal[None, None] & key_mask[:, None, None, :]  # (B, 1, L, T)
        # a padding query sees no real key: let it see itself so no row is fully masked (docs/phantom.md#d19-pad-positions)
        allowed = allowed | (k_idx == q_idx)[None, None]
    elif L > 1:
        is_causal = True
    local = None
    if use_phantom and (cache is None or cache.phantom[0] is None):
        if phantom_index is None:
            phantom_index = first_real_index(key_mask)
        local = phantom_index - past
        if bool(((local < 0) | (local >= L)).any()):
            raise ValueError(
                "the phantom token (first real token of each row) must be inside the first forward call; "
                f"got absolute indices {phantom_index.tolist()} for a call covering [{past}, {past + L})"
            )
        if cache is not None:
            cache.phantom_index = phantom_index
    return AttnContext(
        query_mask=query_mask.bool(), key_mask=key_mask, allowed=allowed, is_causal=is_causal,
        past_length=past, phantom_local_index=local, cache=cache,
        attn_implementation=attn_implementation, use_phantom=use_phantom,
    )


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32 for softmax/gate arithmetic (fp64 stays fp64 for reference tests)."""
    return torch.promote_types(dtype, torch.float32)


def first_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first non-padding position per row (0 for an all-padding row)."""
    m = mask.bool()
    return torch.where(m.any(dim=1), m.int().argmax(dim=1), torch.zeros_like(m[:, 0], dtype=torch.long)).long()


# ------------------------------------------------------------------------------------------------
# Kernels: q (B, H, L, Dk), k/v (B, Hk, T, Dk) -> (B, H, L, Dk)
# ------------------------------------------------------------------------------------------------
def _fold_gqa(q: torch.Tensor, num_kv: int) -> torch.Tensor:
    B, H, L, D = q.shape
    return q.reshape(B, num_kv, (H // num_kv) * L, D)  # rows: (head in group, position)


def _fold_mask(allowed: torch.Tensor, r: int) -> torch.Tensor:
    B, _, L, T = allowed.shape
    return allowed[:, :, None].expand(B, 1, r, L, T).reshape(B, 1, r * L, T)


def _causal_mask(L: int, T: int, device) -> torch.Tensor:
    return torch.ones(L, T, dtype=torch.bool, device=device).tril(diagonal=T - L)


def eager_attention(q, k, v, ctx: AttnContext, scale: float) -> torch.Tensor:
    B, H, L, _ = q.shape
    Hk, T = k.shape[1], k.shape[2]
    r = H // Hk
    qf = _fold_gqa(q, Hk)
    acc = acc_dtype(q.dtype)
    scores = torch.matmul(qf.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, Hk, r*L, T)
    if ctx.allowed is not None:
        mask = _fold_mask(ctx.allowed, r)
    elif ctx.is_causal:
        mask = _causal_mask(L, T, q.device).repeat(r, 1)[None, None]
    else:
        mask = None
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.matmul(probs, v.to(acc)).to(q.dtype)  # (B, Hk, r*L, Dv)
    return out.reshape(B, H, L, v.shape[-1])


def sdpa_attention(q, k, v, ctx: AttnContext, scale: float) -> torch.Tensor:
    B, H, L, _ = q.shape
    Hk = k.shape[1]
    r = H // Hk
    if ctx.is_causal and r > 1:
        # folded rows break the kernel's causal alignment; spell the mask out
        mask = _fold_mask(_causal_mask(L, k.shape[2], q.device)[None, None].expand(B, 1, L, -1), r)
        out = F.scaled_dot_product_attention(_fold_gqa(q, Hk), k, v, attn_mask=mask, scale=scale)
    elif ctx.is_causal:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return out
    else:
        mask = _fold_mask(ctx.allowed, r) if ctx.allowed is not None else None
        out = F.scaled_dot_product_attention(_fold_gqa(q, Hk), k, v, attn_mask=mask, scale=scale)
    return out.reshape(B, H, L, v.shape[-1])


def flash_attention(q, k, v, ctx: AttnContext, scale: float) -> torch.Tensor:
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        _warn_once("flash attention needs CUDA fp16/bf16 tensors: using sdpa for this call")
        return sdpa_attention(q, k, v, ctx, scale)
    from flash_attn import flash_attn_varlen_func  # lazy: optional GPU extra

    B, H, L, D = q.shape
    T = k.shape[2]
    if ctx.packed is not None:  # one varlen sequence per packed sample
        pk = ctx.packed
        idx = pk.token_index
        q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = flash_attn_varlen_func(
            q_t.reshape(B * L, H, D)[idx], k_t.reshape(B * T, -1, k.shape[-1])[idx],
            v_t.reshape(B * T, -1, v.shape[-1])[idx], pk.cu_seqlens, pk.cu_seqlens, pk.max_seqlen, pk.max_seqlen,
            softmax_scale=scale, causal=True)
        full = out.new_zeros(B * L, H, v.shape[-1])
        full[idx] = out
        return full.reshape(B, L, H, -1).transpose(1, 2)
    qm, km = ctx.query_mask, ctx.key_mask
    q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, len, heads, D)
    q_idx = qm.flatten().nonzero().squeeze(1)
    k_idx = km.flatten().nonzero().squeeze(1)
    cu_q = F.pad(qm.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(km.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    out = flash_attn_varlen_func(
        q_t.reshape(B * L, H, D)[q_idx], k_t.reshape(B * T, -1, k.shape[-1])[k_idx],
        v_t.reshape(B * T, -1, v.shape[-1])[k_idx], cu_q, cu_k,
        int(qm.sum(1).max()), int(km.sum(1).max()), softmax_scale=scale, causal=True,
    )  # causal aligned bottom-right: each row's queries are its last keys
    full = out.new_zeros(B * L, H, v.shape[-1])
    full[q_idx] = out
    return full.reshape(B, L, H, -1).transpose(1, 2)


KERNELS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash": flash_attention}


# ------------------------------------------------------------------------------------------------
# Phantom branch modules (exact checkpoint names: docs/phantom.md#phantom-dimension)
# ------------------------------------------------------------------------------------------------
class XAttention(nn.Module):
    """Cross-head attention of every token's heads over the phantom token's heads (docs/phantom.md#xattention)."""

    def __init__(self, in_features: int, eta: float = 1e-4):
        super().__init__()
        self.linear_q = nn.Linear(in_features, in_features, bias=False)
        self.linear_k = nn.Linear(in_features, in_features, bias=False)
        self.linear_v = nn.Linear(in_features, in_features, bias=False)
        self.linear_o = nn.Linear(in_features, in_features, bias=False)
        self.eta = eta
        self.scale = in_features**-0.5

    def phantom_keys(self, phantom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (pre-scaled by 1/sqrt(D)) and values of the cross-head attention, from the phantom
        states (B, 1, G, D) -> 2x (B, G, D). They are fixed for a sequence, so decoding computes them
        once (stored in the cache)."""
        return F.gelu(self.linear_k(phantom))[:, 0] * self.scale, F.gelu(self.linear_v(phantom))[:, 0]

    def forward(self, x: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, residual: bool) -> torch.Tensor:
        """x (B, L, G, D); kh, vh (B, G, D) from ``phantom_keys`` -> (B, L, G, D). Packed rows pass
        kh, vh (B, L, G, D): every token its own sample's phantom keys."""
        B, L, G, D = x.shape
        if kh.dim() == 4:
            qh = F.gelu(self.linear_q(x))  # (B, L, G, D)
            scores = torch.matmul(qh, kh.transpose(-1, -2))  # (B, L, G, G)
            acc = acc_dtype(scores.dtype)
            attn = scores.softmax(dim=-1) if acc == scores.dtype else scores.to(acc).softmax(dim=-1).to(vh.dtype)
            z = F.gelu(self.linear_o(torch.matmul(attn, vh)))
            return torch.add(x, z, alpha=self.eta) if residual else z * self.eta
        qh = F.gelu(self.linear_q(x)).reshape(B, L * G, D)  # every (token, head) vector is one query
        # one GEMM per row instead of L tiny (G x G) ones: the keys are shared by all L tokens
        scores = torch.bmm(qh, kh.transpose(1, 2))  # (B, L*G, G) over the phantom token's heads
        acc = acc_dtype(scores.dtype)
        attn = scores.softmax(dim=-1) if acc == scores.dtype else scores.to(acc).softmax(dim=-1).to(vh.dtype)
        z = F.gelu(self.linear_o(torch.bmm(attn, vh))).reshape(B, L, G, D)
        return torch.add(x, z, alpha=self.eta) if residual else z * self.eta


def add_phantom_modules(module: nn.Module, head_dim: int, eta: float) -> None:
    """Attach the five phantom sub-modules directly to an attention module, so the parameters sit
    under ``self_attn.`` / ``attention.`` exactly as in the released checkpoints."""
    module.xattn_query_phantom = XAttention(head_dim, eta)
    module.xattn_key_phantom = XAttention(head_dim, eta)
    module.xattn_value_phantom = XAttention(head_dim, eta)
    module.gating_phantom_1 = nn.Linear(head_dim, 1)
    module.gating_phantom_2 = nn.Linear(head_dim, 1)


def phantom_attention(
    module: nn.Module,
    layer_idx: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: AttnContext,
) -> torch.Tensor:
    """Attention with the phantom branch. q (B, L, H, D), k/v (B, L, Hk, D) after RoPE.

    Returns (B, L, H, D). ``module`` owns the phantom sub-modules (see ``add_phantom_modules``).
    """
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D)  # original head dim, not 2D (docs/phantom.md#attention-layer step 4)
    cache = ctx.cache
    use_phantom = ctx.use_phantom
    if use_phantom:
        xq, xk, xv = module.xattn_query_phantom, module.xattn_key_phantom, module.xattn_value_phantom
        states = cache.phantom[layer_idx] if cache is not None else None
        if ctx.packed is not None:
            # packed rows: the phantom keys of every sample from its own first token, then one
            # copy per token of the sample (computed once per sample, not once per token)
            pk = ctx.packed
            rows, pos = pk.starts
            derived = (*xq.phantom_keys(q[rows, pos][:, None]), *xk.phantom_keys(k[rows, pos][:, None]),
                       *xv.phantom_keys(v[rows, pos][:, None]))  # each (S, G, D)
            derived = tuple(t[pk.segment_of] for t in derived)  # (B, L, G, D)
            states = None
        elif states is None:
            rows = torch.arange(q.shape[0], device=q.device)
            idx = ctx.phantom_local_index
            states = PhantomStates(q[rows, idx][:, None], k[rows, idx][:, None], v[rows, idx][:, None])
            if cache is not None:
                states = PhantomStates(*(t.detach() for t in (states.q, states.k, states.v)))
                cache.phantom[layer_idx] = states
        if ctx.packed is not None:
            pass  # derived above
        elif states.derived is None:
            derived = (*xq.phantom_keys(states.q), *xk.phantom_keys(states.k), *xv.phantom_keys(states.v))
            if cache is not None:
                states.derived = derived
        else:
            derived = states.derived
        q = torch.cat([q, xq(q, derived[0], derived[1], residual=False)], dim=-1)  # (B, L, H, 2D)
        k = torch.cat([k, xk(k, derived[2], derived[3], residual=False)], dim=-1)  # (B, L, Hk, 2D)
        v = torch.cat([v, xv(v, derived[4], derived[5], residual=True)], dim=-1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, L, Dk)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)  # (B, Hk, T, Dk)
    out = KERNELS[ctx.attn_implementation](q, k, v, ctx, scale).transpose(1, 2)  # (B, L, H, Dk)
    if not use_phantom:
        return out
    # gate g = exp(w1) / (exp(w1) + exp(w2)) = sigmoid(w1 - w2), in fp32 without overflow (docs/phantom.md#d8-gate-numerics);
    # w1 - w2 = [o1, o2] . [a1, -a2] + (b1 - b2) is one matrix-vector product over the 2D-wide output
    g1, g2 = module.gating_phantom_1, module.gating_phantom_2
    acc = acc_dtype(out.dtype)
    out_acc = out if out.dtype == acc else out.to(acc)
    w = F.linear(out_acc, torch.cat([g1.weight, -g2.weight], dim=1).to(acc), (g1.bias - g2.bias).to(acc))  # (B, L, H, 1)
    o1, o2 = out_acc[..., :D], out_acc[..., D:]
    mixed = torch.addcmul(o2, torch.sigmoid(w), o1 - o2)  # g * o1 + (1 - g) * o2
    return mixed if mixed.dtype == out.dtype else mixed.to(out.dtype)
