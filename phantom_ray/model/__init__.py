"""Phantom model: pure torch + transformers building blocks (no Ray, no DeepSpeed)."""

from phantom_ray.model.attention import ATTN_IMPLEMENTATIONS, is_flash_attn_available
from phantom_ray.model.cache import PhantomCache
from phantom_ray.model.config import (
    PRESETS,
    TINY_SPECIAL_TOKENS,
    InternVisionConfig,
    LLMConfig,
    PhantomConfig,
    list_presets,
)
from phantom_ray.model.modeling import GenerationOutput, PhantomForCausalLM, PhantomOutput
from phantom_ray.model.info import parameter_counts

__all__ = [
    "ATTN_IMPLEMENTATIONS", "GenerationOutput", "InternVisionConfig", "LLMConfig", "PRESETS", "PhantomCache",
    "PhantomConfig", "PhantomForCausalLM", "PhantomOutput", "TINY_SPECIAL_TOKENS", "is_flash_attn_available",
    "list_presets", "parameter_counts",
]
