"""The three LLM families of Phantom on transformers' building blocks, with the phantom attention.

* Qwen2 (Phantom-0.5B): separate q/k/v projections with bias; transformers' ``Qwen2MLP``/``Qwen2RMSNorm``.
* InternLM2 (Phantom-1.8B, -7B): Llama-like with a packed ``wqkv`` projection (per kv group: r query
  heads, then the key head, then the value head; docs/phantom.md#internlm2-packed-wqkv) and ``w1/w2/w3`` SwiGLU; transformers has
  no InternLM2, so the attention and MLP are written here (norms reuse ``LlamaRMSNorm``).
* Phi-3 (Phantom-3.8B): fused ``qkv_proj`` split contiguously; transformers' ``Phi3MLP``.

Module names reproduce the released checkpoint keys (docs/phantom.md#checkpoint-keys); only the attention modules differ
from the base models, by the phantom sub-modules of ``attention.py``. One decoder layer class
serves all families; the family only chooses attribute names and projection layouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.phi3.modeling_phi3 import Phi3MLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

from phantom_ray.model.attention import AttnContext, add_phantom_modules, phantom_attention
from phantom_ray.model.config import LLMConfig
from phantom_ray.model.rope import apply_rope


class _PhantomAttention(nn.Module):
    """Shared forward: project -> RoPE -> phantom attention -> output projection."""

    def __init__(self, cfg: LLMConfig, layer_idx: int, eta: float):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def out_proj(self, o: torch.Tensor) -> torch.Tensor:
        return self.o_proj(o)  # Qwen2 / Phi-3 name; InternLM2 overrides (wo)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.project(x)  # (B, L, H, D), (B, L, Hk, D), (B, L, Hk, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = phantom_attention(self, self.layer_idx, q, k, v, ctx)  # (B, L, H, D)
        return self.out_proj(o.reshape(B, L, self.num_heads * self.head_dim))


class Qwen2PhantomAttention(_PhantomAttention):
    def __init__(self, cfg: LLMConfig, layer_idx: int, eta: float):
        super().__init__(cfg, layer_idx, eta)
        H, Hk, D, C = self.num_heads, self.num_kv_heads, self.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(C, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(C, Hk * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(C, Hk * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        add_phantom_modules(self, D, eta)

    def project(self, x):
        B, L, _ = x.shape
        D = self.head_dim
        return (self.q_proj(x).view(B, L, -1, D), self.k_proj(x).view(B, L, -1, D), self.v_proj(x).view(B, L, -1, D))


class Phi3PhantomAttention(_PhantomAttention):
    def __init__(self, cfg: LLMConfig, layer_idx: int, eta: float):
        super().__init__(cfg, layer_idx, eta)
        H, Hk, D, C = self.num_heads, self.num_kv_heads, self.head_dim, cfg.hidden_size
        self.qkv_proj = nn.Linear(C, (H + 2 * Hk) * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        add_phantom_modules(self, D, eta)

    def project(self, x):
        B, L, _ = x.shape
        H, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, Hk * D, Hk * D], dim=-1)  # contiguous layout
        return q.view(B, L, H, D), k.view(B, L, Hk, D), v.view(B, L, Hk, D)


class InternLM2PhantomAttention(_PhantomAttention):
    def __init__(self, cfg: LLMConfig, layer_idx: int, eta: float):
        super().__init__(cfg, layer_idx, eta)
        H, Hk, D, C = self.num_heads, self.num_kv_heads, self.head_dim, cfg.hidden_size
        self.wqkv = nn.Linear(C, (H + 2 * Hk) * D, bias=cfg.attention_bias)
        self.wo = nn.Linear(H * D, C, bias=cfg.attention_bias)
        add_phantom_modules(self, D, eta)

    def project(self, x):
        B, L, _ = x.shape
        Hk, D = self.num_kv_heads, self.head_dim
        r = self.num_heads // Hk
        qkv = self.wqkv(x).view(B, L, Hk, r + 2, D)  # per kv group: r queries, key, value
        q = qkv[..., :r, :].reshape(B, L, Hk * r, D)
        return q, qkv[..., -2, :], qkv[..., -1, :]

    def out_proj(self, o):
        return self.wo(o)


class InternLM2MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# family -> (attention attr, mlp attr, pre-attn norm, pre-mlp norm, attention cls, mlp cls, norm cls,
#            embedding attr, head attr)
FAMILY_LAYOUT = {
    "qwen2": ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
              Qwen2PhantomAttention, Qwen2MLP, Qwen2RMSNorm, "embed_tokens", "lm_head"),
    "phi3": ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
             Phi3PhantomAttention, Phi3MLP, Qwen2RMSNorm, "embed_tokens", "lm_head"),
    "internlm2": ("attention", "feed_forward", "attention_norm", "ffn_norm",
                  InternLM2PhantomAttention, InternLM2MLP, LlamaRMSNorm, "tok_embeddings", "output"),
}


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x)), attribute names by family."""

    def __init__(self, cfg: LLMConfig, layer_idx: int, eta: float):
        super().__init__()
        attn_name, mlp_name, n1, n2, attn_cls, mlp_cls, norm_cls, _, _ = FAMILY_LAYOUT[cfg.family]
        self._names = (attn_name, mlp_name, n1, n2)
        setattr(self, attn_name, attn_cls(cfg, layer_idx, eta))
        setattr(self, mlp_name, mlp_cls(cfg))
        setattr(self, n1, norm_cls(cfg.hidden_size, eps=cfg.rms_norm_eps))
        setattr(self, n2, norm_cls(cfg.hidden_size, eps=cfg.rms_norm_eps))

    def forward(self, x, cos, sin, ctx: AttnContext):
        attn, mlp, n1, n2 = (getattr(self, n) for n in self._names)
        x = x + attn(n1(x), cos, sin, ctx)
        return x + mlp(n2(x))


class DecoderModel(nn.Module):
    """``language_model.model``: embeddings, layers, final norm."""

    def __init__(self, cfg: LLMConfig, eta: float):
        super().__init__()
        layout = FAMILY_LAYOUT[cfg.family]
        self._embed_name = layout[7]
        setattr(self, self._embed_name, nn.Embedding(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, eta) for i in range(cfg.num_hidden_layers))
        self.norm = layout[6](cfg.hidden_size, eps=cfg.rms_norm_eps)

    @property
    def embed(self) -> nn.Embedding:
        return getattr(self, self._embed_name)


class LMHead(nn.Linear):
    """The LM head: an ``nn.Linear`` whose forward can also run a caller's function of its weight.

    ``head(h, fused=fn)`` returns ``fn(h, head.weight)`` from inside this module's own forward, so
    that whatever wraps modules with hooks sees the weight used where it belongs: under DeepSpeed
    ZeRO-3 the partitioned weight is gathered for ``fn`` (and again for its backward) exactly as for
    a plain ``head(h)``. The training loss uses it for the chunked fused head + log-softmax
    (``phantom_ray.train.loss``) that never forms the (tokens x vocab) logits."""

    def forward(self, x: torch.Tensor, fused=None) -> torch.Tensor:
        if fused is not None:
            return fused(x, self.weight)
        return super().forward(x)


class PhantomLanguageModel(nn.Module):
    """``language_model``: the decoder plus the LM head (``lm_head`` or InternLM2's ``output``)."""

    def __init__(self, cfg: LLMConfig, eta: float):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, eta)
        self._head_name = FAMILY_LAYOUT[cfg.family][8]
        setattr(self, self._head_name, LMHead(cfg.hidden_size, cfg.vocab_size, bias=False))
        if cfg.tie_word_embeddings:
            self.head.weight = self.model.embed.weight

    @property
    def head(self) -> LMHead:
        return getattr(self, self._head_name)

    def attention_modules(self) -> list[_PhantomAttention]:
        return [getattr(layer, layer._names[0]) for layer in self.model.layers]
