"""Phantom model: pure torch + transformers building blocks (no Ray, no DeepSpeed)."""

from phantom_ray.model.config import (
    PRESETS,
    TINY_SPECIAL_TOKENS,
    InternVisionConfig,
    LLMConfig,
    PhantomConfig,
    list_presets,
)

__all__ = ["PRESETS", "TINY_SPECIAL_TOKENS", "InternVisionConfig", "LLMConfig", "PhantomConfig", "list_presets"]
