"""InternViT encoder, 0.5 pixel shuffle and the ``vision_proj`` projector (docs/phantom.md#vision).

Same code for all four Phantom sizes (InternViT-300M-448px); key names follow the released
checkpoints (``vision_model.embeddings.*``, ``vision_model.encoder.layers.{i}.*``, ``vision_proj.{0,1,3}``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from phantom_ray.model.config import InternVisionConfig


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, C))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, C, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_patches + 1, C))

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        pos = self.position_embedding
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        side = int(self.num_patches**0.5)
        if (h, w) != (side, side):
            grid = patch_pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, C, side, side)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            patch_pos = grid.reshape(1, -1, h * w).permute(0, 2, 1).to(pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (N, h*w, C), row-major over the grid
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        return x + self._pos_embed(h, w).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(C, 3 * C, bias=cfg.qkv_bias)
        self.proj = nn.Linear(C, C)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = LlamaRMSNorm(C, eps=cfg.layer_norm_eps)
            self.k_norm = LlamaRMSNorm(C, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, C = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(N, L, 3, H, C // H).unbind(dim=2)  # layout (three, heads, head_dim)
        if self.qk_normalization:
            q = self.q_norm(q.reshape(N, L, C)).view(N, L, H, -1)
            k = self.k_norm(k.reshape(N, L, C)).view(N, L, H, -1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (N, H, L, d)
        return self.proj(o.transpose(1, 2).reshape(N, L, C))


class VisionMLP(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _norm(cfg: InternVisionConfig) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return LlamaRMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class VisionLayer(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.norm1 = _norm(cfg)
        self.norm2 = _norm(cfg)
        self.ls1 = nn.Parameter(cfg.initializer_factor * torch.ones(cfg.hidden_size))
        self.ls2 = nn.Parameter(cfg.initializer_factor * torch.ones(cfg.hidden_size))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x):
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class InternVisionModel(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> last hidden state (N, 1 + patches, C); no final norm."""
        return self.encoder(self.embeddings(pixel_values))


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """The reference op order (docs/phantom.md#vision): (N, w, h, C) -> (N, w*s, h*s, C/s^2); output[i, j] is the
    concatenation of x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1]."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def build_projector(vit_hidden: int, llm_hidden: int, downsample_ratio: float = 0.5) -> nn.Sequential:
    in_dim = int(vit_hidden / downsample_ratio**2)
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))
