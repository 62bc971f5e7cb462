"""Parameter counts per part, computed on the meta device (no weights allocated)."""

from __future__ import annotations

import torch

from phantom_ray.model.config import PhantomConfig


def build_meta(config: PhantomConfig):
    from phantom_ray.model.modeling import PhantomForCausalLM

    with torch.device("meta"):
        return PhantomForCausalLM(config, attn_implementation="eager")


def parameter_counts(config_or_preset: PhantomConfig | str) -> dict[str, int]:
    """{'vision', 'projector', 'llm', 'phantom', 'total'}; 'llm' excludes the phantom modules."""
    cfg = PhantomConfig.from_preset(config_or_preset) if isinstance(config_or_preset, str) else config_or_preset
    model = build_meta(cfg)
    counts = {"vision": 0, "projector": 0, "llm": 0, "phantom": 0}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "_phantom" in name:
            counts["phantom"] += p.numel()
        elif name.startswith("vision_model."):
            counts["vision"] += p.numel()
        elif name.startswith("vision_proj."):
            counts["projector"] += p.numel()
        else:
            counts["llm"] += p.numel()
    counts["total"] = sum(counts.values())
    return counts
