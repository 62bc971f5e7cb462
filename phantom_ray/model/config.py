"""Typed configuration for Phantom models and the size presets.

The released ``BK-Lee/Phantom-*`` ``config.json`` files nest a vision config (InternViT) and an LLM
config (Qwen2, InternLM2 or Phi-3) under a top-level ``PhantomConfig`` (docs/phantom.md#overall-model).
We parse them with small dataclasses of our own instead of transformers' strict config classes, so
that one parser reads every size, on any transformers version, and unknown keys survive a
round trip (they are kept in ``extra`` and written back).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES = ("qwen2", "internlm2", "phi3")

# architectures[0] of the llm_config -> family (docs/phantom.md#overall-model; LlamaForCausalLM is accepted by every size
# and means "the family of this size"; we resolve it from the other fields in ``_family_of``).
_ARCH_TO_FAMILY = {
    "Qwen2ForCausalLM": "qwen2",
    "InternLM2ForCausalLM": "internlm2",
    "Phi3ForCausalLM": "phi3",
}
_FAMILY_TO_ARCH = {v: k for k, v in _ARCH_TO_FAMILY.items()}


def _pop_known(d: dict, cls) -> tuple[dict, dict]:
    names = {f.name for f in dataclasses.fields(cls)}
    known = {k: v for k, v in d.items() if k in names}
    extra = {k: v for k, v in d.items() if k not in names}
    return known, extra


@dataclass
class InternVisionConfig:
    """InternViT encoder (docs/phantom.md#vision). Defaults are InternViT-300M-448px [UNCONFIRMED: the released
    config.json is authoritative and is read whenever a checkpoint is loaded]."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_attention_heads: int = 16
    num_hidden_layers: int = 24
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    qk_normalization: bool = False
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision_config.hidden_size={self.hidden_size} is not divisible by "
                f"vision_config.num_attention_heads={self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision_config.image_size={self.image_size} is not a multiple of "
                f"vision_config.patch_size={self.patch_size}"
            )
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"vision_config.norm_type must be layer_norm or rms_norm, got {self.norm_type!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "InternVisionConfig":
        known, extra = _pop_known(dict(d), cls)
        extra.pop("extra", None)
        return cls(**known, extra={**d.get("extra", {}), **extra})

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        d.update(self.extra)
        d["model_type"] = "intern_vit_6b"
        d.setdefault("architectures", ["InternVisionModel"])
        return d


@dataclass
class LLMConfig:
    """The LLM part: one dataclass for the three families (docs/phantom.md#llm-families).

    Field names follow the Hugging Face configs, so transformers' building blocks (``Qwen2MLP``,
    ``Phi3MLP``, ``Qwen2RMSNorm``) accept it as their ``config``.
    """

    family: str = "qwen2"
    vocab_size: int = 151655
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # None, {"type": "dynamic"|"linear", "factor": f} (InternLM2) or
    # {"type": "longrope"|"su", "short_factor": [...], "long_factor": [...]} (Phi-3)
    rope_scaling: dict | None = None
    original_max_position_embeddings: int | None = None  # Phi-3 longrope
    attention_bias: bool = True  # q/k/v bias (Qwen2: True; InternLM2: config "bias"; Phi-3: False)
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"llm_config.family must be one of {FAMILIES}, got {self.family!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"llm_config.hidden_size={self.hidden_size} is not divisible by "
                f"llm_config.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"llm_config.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"llm_config.num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("dynamic", "linear", "longrope", "su", "default"):
                raise ValueError(f"llm_config.rope_scaling type {kind!r} is not supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "LLMConfig":
        d = dict(d)
        d.pop("extra", None)
        arch = (d.get("architectures") or [None])[0]
        family = d.pop("family", None) or _family_of(arch, d)
        # transformers 5 writes rope settings as rope_parameters; older files use rope_theta/rope_scaling
        rp = d.pop("rope_parameters", None)
        if rp:
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", {k: v for k, v in rp.items() if k != "rope_theta"})
        if d.get("use_sliding_window") is False:  # Qwen2 configs list a window they do not use
            d["sliding_window"] = None
        if family == "internlm2" and "bias" in d:
            d["attention_bias"] = d.pop("bias")
        if family == "phi3":
            d.setdefault("attention_bias", False)
        if family == "qwen2":
            d.setdefault("attention_bias", True)
        known, extra = _pop_known(d, cls)
        known["family"] = family
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("extra", "family")}
        if self.family == "internlm2":
            d["bias"] = d.pop("attention_bias")
        else:
            d.pop("attention_bias")
        d.update(self.extra)
        d["architectures"] = [_FAMILY_TO_ARCH[self.family]]
        d["model_type"] = self.family
        return d


def _family_of(arch: str | None, d: dict) -> str:
    if arch in _ARCH_TO_FAMILY:
        return _ARCH_TO_FAMILY[arch]
    if arch == "LlamaForCausalLM" or arch is None:
        mt = d.get("model_type", "")
        if mt in FAMILIES:
            return mt
        if "qwen" in mt:
            return "qwen2"
        if "phi" in mt:
            return "phi3"
        if "internlm" in mt:
            return "internlm2"
    raise ValueError(
        f"llm_config.architectures[0]={arch!r} is not supported; expected one of "
        f"{sorted(_ARCH_TO_FAMILY)} (or LlamaForCausalLM with a model_type naming the family)"
    )


TEMPLATES = {"qwen2": "chatml", "internlm2": "chatml", "phi3": "phi3"}


@dataclass
class PhantomConfig:
    """Top-level Phantom config (docs/phantom.md#overall-model), with the fields the original reads but never declared
    (``image_token_index``, ``eos_token_id``, ``ignore_index``) made explicit."""

    vision_config: InternVisionConfig = field(default_factory=InternVisionConfig)
    llm_config: LLMConfig = field(default_factory=LLMConfig)
    downsample_ratio: float = 0.5
    force_image_size: int | None = None
    template: str | None = None
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    image_token_index: int = 151648
    img_start_token_index: int | None = None
    img_end_token_index: int | None = None
    eos_token_id: int | list | None = 151645
    ignore_index: int = -100
    # Phantom branch residual scale (docs/phantom.md#xattention). Not stored in released checkpoints; tests use 1.0 so a
    # broken phantom branch moves logits by O(1) (docs/phantom.md#near-identity).
    phantom_eta: float = 1e-4
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    preset: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = InternVisionConfig.from_dict(self.vision_config)
        if isinstance(self.llm_config, dict):
            self.llm_config = LLMConfig.from_dict(self.llm_config)
        if self.template is None:
            self.template = TEMPLATES[self.llm_config.family]
        if self.template not in ("chatml", "phi3"):
            # released configs name the template after the InternVL conversation template
            self.template = TEMPLATES[self.llm_config.family]
        grid = self.image_size // self.vision_config.patch_size
        if abs(self.downsample_ratio - 0.5) > 1e-9:
            raise ValueError(f"downsample_ratio must be 0.5 (pixel shuffle), got {self.downsample_ratio}")
        if grid % 2:
            raise ValueError(f"image_size/patch_size = {grid} must be even for the 0.5 pixel shuffle")
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ValueError(
                f"need 1 <= min_dynamic_patch ({self.min_dynamic_patch}) <= max_dynamic_patch ({self.max_dynamic_patch})"
            )

    # ---- derived values -------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.llm_config.family

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision_config.image_size

    @property
    def num_image_token(self) -> int:
        """Image tokens per tile: (image_size/patch)^2 * ratio^2 (256 for the released models)."""
        return int((self.image_size // self.vision_config.patch_size) ** 2 * self.downsample_ratio**2)

    @property
    def stop_token_ids(self) -> list[int]:
        ids = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        return [i for i in ids if i is not None]

    # ---- (de)serialisation ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "PhantomConfig":
        d = copy.deepcopy(d)
        d.pop("model_type", None)
        d.pop("architectures", None)
        d.pop("extra", None)
        if d.get("llm_config") is None:
            raise ValueError("config has no llm_config: cannot tell which LLM family to build")
        known, extra = _pop_known(d, cls)
        for k in ("transformers_version", "torch_dtype", "dtype", "auto_map", "_name_or_path",
                  "_commit_hash", "is_composition"):
            extra.pop(k, None)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        d = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            d[f.name] = v.to_dict() if hasattr(v, "to_dict") else copy.deepcopy(v)
        d.update(self.extra)
        d["model_type"] = "phantom"
        d["architectures"] = ["PhantomForCausalLM"]
        return d

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_json_file(cls, path: str | Path) -> "PhantomConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PhantomConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
        d = copy.deepcopy(PRESETS[name])
        d["preset"] = name
        cfg = cls.from_dict(d)
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise ValueError(f"PhantomConfig has no field {k!r}")
            setattr(cfg, k, v)
        return cfg

    def replace(self, **changes) -> "PhantomConfig":
        return dataclasses.replace(copy.deepcopy(self), **changes)


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------

_VIT_300M = InternVisionConfig().to_dict()  # [UNCONFIRMED] InternViT-300M-448px values (docs/phantom.md#vision)

# Special tokens carried by the tiny locally trained tokenizers, in id order (ids 0..n-1). The real
# checkpoints ship their own tokenizers; these only keep the tiny presets self-consistent.
TINY_SPECIAL_TOKENS = {
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
               "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<unk>"],
    "phi3": ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", "<img>", "</img>",
             "<IMG_CONTEXT>", "<unk>"],
}


def _tiny_ids(template: str) -> dict:
    toks = TINY_SPECIAL_TOKENS[template]
    end = "<|im_end|>" if template == "chatml" else "<|end|>"
    return dict(
        image_token_index=toks.index("<IMG_CONTEXT>"),
        img_start_token_index=toks.index("<img>"),
        img_end_token_index=toks.index("</img>"),
        eos_token_id=toks.index(end),
    )


_TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 image_size=32, patch_size=8)  # 4x4 patches -> 4 image tokens per tile
_TINY_VOCAB = 384

PRESETS: dict[str, dict] = {
    "phantom-0.5b": dict(
        vision_config=_VIT_300M,
        llm_config=dict(
            architectures=["Qwen2ForCausalLM"], vocab_size=151655,  # vocab [UNCONFIRMED]
            hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
            tie_word_embeddings=False, eos_token_id=151645, pad_token_id=151643,
        ),
        image_token_index=151648, img_start_token_index=151646, img_end_token_index=151647,
        eos_token_id=151645,
    ),
    "phantom-1.8b": dict(
        vision_config=_VIT_300M,
        llm_config=dict(
            architectures=["InternLM2ForCausalLM"], vocab_size=92553,  # vocab [UNCONFIRMED]
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
            rope_scaling={"type": "dynamic", "factor": 2.0},  # [UNCONFIRMED]
            bias=False,  # [UNCONFIRMED]
            eos_token_id=92542, pad_token_id=2, bos_token_id=1,
        ),
        image_token_index=92546, img_start_token_index=92544, img_end_token_index=92545,
        eos_token_id=92542,
    ),
    "phantom-3.8b": dict(
        vision_config=_VIT_300M,
        llm_config=dict(
            # Phi-3-mini. The 128k variant uses longrope ('su') factors that only the released
            # config.json carries; the preset uses plain RoPE at 4k [UNCONFIRMED: vocab, context].
            architectures=["Phi3ForCausalLM"], vocab_size=32020,
            hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=4096,
            original_max_position_embeddings=4096, sliding_window=262144,
            bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
        ),
        image_token_index=32013, img_start_token_index=32011, img_end_token_index=32012,  # [UNCONFIRMED]
        eos_token_id=32007,
    ),
    "phantom-7b": dict(
        vision_config=_VIT_300M,
        llm_config=dict(
            architectures=["InternLM2ForCausalLM"], vocab_size=92553,  # vocab [UNCONFIRMED]
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
            rope_scaling={"type": "dynamic", "factor": 2.0},  # [UNCONFIRMED]
            bias=False,
            eos_token_id=92542, pad_token_id=2, bos_token_id=1,
        ),
        image_token_index=92546, img_start_token_index=92544, img_end_token_index=92545,
        eos_token_id=92542,
    ),
    # ---- tiny presets for CPU tests: GQA where the family has it, 4 image tokens per tile --------
    "tiny-qwen2": dict(
        vision_config=_TINY_VIT,
        llm_config=dict(
            architectures=["Qwen2ForCausalLM"], vocab_size=_TINY_VOCAB, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=2048,
            eos_token_id=_tiny_ids("chatml")["eos_token_id"], pad_token_id=0,
        ),
        **_tiny_ids("chatml"),
    ),
    "tiny-internlm2": dict(
        vision_config=_TINY_VIT,
        llm_config=dict(
            architectures=["InternLM2ForCausalLM"], vocab_size=_TINY_VOCAB, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=2048,
            rope_scaling={"type": "dynamic", "factor": 2.0}, bias=False,
            eos_token_id=_tiny_ids("chatml")["eos_token_id"], pad_token_id=0,
        ),
        **_tiny_ids("chatml"),
    ),
    "tiny-phi3": dict(
        vision_config=_TINY_VIT,
        llm_config=dict(
            architectures=["Phi3ForCausalLM"], vocab_size=_TINY_VOCAB, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=256,
            original_max_position_embeddings=64,
            rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
                          "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]},
            eos_token_id=_tiny_ids("phi3")["eos_token_id"], pad_token_id=0,
        ),
        **_tiny_ids("phi3"),
    ),
}


def list_presets() -> list[str]:
    return list(PRESETS)
