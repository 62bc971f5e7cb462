"""Typed training configuration: one dataclass per concern, loaded from YAML, dotted overrides.

A training YAML has the sections ``model``, ``data`` (:class:`phantom_ray.data.pipeline.DataConfig`),
``loss``, ``recipe``, ``optim``, ``deepspeed``, ``scaling`` and ``run``; every field has a default
except ``data.shards``. Unknown keys are errors that name the field and the file::

    cfg = TrainConfig.from_yaml("configs/train/tiny-cpu.yaml", overrides=["optim.lr=3e-3", "run.max_steps=20"])
    cfg.save("runs/x/train_config.yaml")       # written next to every checkpoint and export

Override values are parsed as YAML scalars (``3e-3`` -> float, ``true`` -> bool, ``[a, b]`` -> list,
``null`` -> None).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from phantom_ray import storage
from phantom_ray.data.pipeline import DataConfig

# Peak dense bf16 throughput (FLOP/s) per device, for MFU. Override with run.peak_flops.
KNOWN_PEAK_FLOPS = {
    "H100": 989e12,    # H100 SXM bf16 dense
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


@dataclass
class ModelSection:
    preset: str = "tiny-qwen2"               # PhantomConfig preset (random init unless init_from is set)
    init_from: str | None = None             # HF-layout checkpoint dir / s3:// URI (step 2: step 1's export)
    attn_implementation: str = "sdpa"        # eager | sdpa | flash (flash falls back to sdpa)
    phantom_eta: float | None = None         # None: the preset's value
    gradient_checkpointing: bool = False     # activation checkpointing per decoder layer

    def __post_init__(self):
        if self.attn_implementation not in ("eager", "sdpa", "flash"):
            raise ValueError(f"model.attn_implementation={self.attn_implementation!r}: expected eager, sdpa or flash")


@dataclass
class LossSection:
    kind: str = "po"          # po (SFT + SimPO-style preference) | sft | dpo (reference log-probs precomputed)
    beta: float = 2.0         # reward scale (docs/phantom.md#phantom-optimization: UNCONFIRMED; SimPO's range)
    gamma: float = 1.0        # target reward margin
    pref_weight: float = 1.0  # weight of the preference term
    sft_weight: float = 1.0   # weight of the SFT term on the chosen answer
    reference: str | None = None  # dpo: reference model (checkpoint / preset); default model.init_from

    def __post_init__(self):
        if self.kind not in ("po", "sft", "dpo"):
            raise ValueError(f"loss.kind={self.kind!r}: expected po, sft or dpo")
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if self.pref_weight < 0 or self.sft_weight < 0:
            raise ValueError("loss.pref_weight and loss.sft_weight must be >= 0")


@dataclass
class LoraSection:
    enabled: bool = False     # step 2 only; needs `peft`
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class RecipeSection:
    step: int = 1                    # 1: vision_proj + phantom modules only; 2: everything
    freeze_vision: bool = False      # step 2: keep the vision encoder frozen
    lora: LoraSection = field(default_factory=LoraSection)

    def __post_init__(self):
        if self.step not in (1, 2):
            raise ValueError(f"recipe.step={self.step!r}: expected 1 or 2")
        if self.lora.enabled and self.step != 2:
            raise ValueError("recipe.lora.enabled needs recipe.step=2 (step 1 trains no LLM weights)")


@dataclass
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0           # 0 disables clipping
    grad_accum: int = 1              # micro-batches per optimizer step

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    precision: str = "auto"          # auto: bf16 on GPU, fp32 on CPU | bf16 | fp32
    offload_optimizer: bool = False  # ZeRO-Offload (uses DeepSpeedCPUAdam)
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage={self.zero_stage!r}: expected 0, 1, 2 or 3")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"deepspeed.precision={self.precision!r}: expected auto, bf16 or fp32")


@dataclass
class ScalingSection:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5     # fractional on small machines, or Ray Data starves (STACK_NOTES)
    gpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] | None = None  # overrides the two above when given

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"scaling.num_workers must be >= 1, got {self.num_workers}")

    def resources(self) -> dict[str, float]:
        if self.resources_per_worker is not None:
            return dict(self.resources_per_worker)
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res


@dataclass
class RunSection:
    name: str = "phantom-train"
    storage_path: str = "runs"       # local dir or s3://bucket/prefix (Ray Train RunConfig.storage_path)
    epochs: int = 1
    max_steps: int | None = None     # optimizer steps in all; None: epochs x steps per epoch
    checkpoint_every: int = 50       # optimizer steps; a checkpoint is also written at the end
    report_every: int = 10           # optimizer steps between ray.train.report of metrics
    max_failures: int = 2            # group restarts from the latest checkpoint after a lost worker
    num_to_keep: int | None = 2      # checkpoints kept by Ray Train
    export: str | None = None        # consolidated HF-layout model; default <storage>/<name>/export
    seed: int = 0
    peak_flops: float | None = None  # per device for MFU; default: known GPU peak, none on CPU

    def __post_init__(self):
        for name in ("epochs", "checkpoint_every", "report_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"run.max_steps must be >= 1, got {self.max_steps}")
        if self.max_failures < 0:
            raise ValueError(f"run.max_failures must be >= 0, got {self.max_failures}")

    def export_uri(self) -> str:
        return self.export or storage.join(self.storage_path, self.name, "export")


@dataclass
class SynthSection:
    """Smoke runs only: write and pack the synthetic shapes corpus to ``data.shards`` when it has no
    manifest yet (``phantom-ray data synth`` + ``data pack``)."""

    enabled: bool = False
    num_samples: int = 512
    layout: str = "triples"      # triples for PO; llava for SFT
    image_size: int = 32
    seed: int = 0


@dataclass
class TrainConfig:
    data: DataConfig
    synth: SynthSection = field(default_factory=SynthSection)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    recipe: RecipeSection = field(default_factory=RecipeSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self):
        if self.loss.kind in ("po", "dpo") and self.data.task != "po":
            raise ValueError(f"loss.kind={self.loss.kind!r} needs data.task='po' (chosen/rejected pairs), "
                             f"got data.task={self.data.task!r}")
        if self.data.model != self.model.preset and self.model.init_from is None:
            raise ValueError(f"data.model={self.data.model!r} differs from model.preset={self.model.preset!r}: "
                             "the processor must match the model")

    # ---- loading / saving ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, overrides: list[str] | None = None, where: str = "config") -> "TrainConfig":
        d = _copy(d or {})
        for item in overrides or []:
            apply_override(d, item)
        try:
            return _build(cls, d, "")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] | None = None) -> "TrainConfig":
        import yaml

        d = yaml.safe_load(storage.read_text(str(path))) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a training config is a mapping of sections")
        return cls.from_dict(d, overrides, where=str(path))

    load = from_yaml

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, uri: str) -> None:
        storage.write_text_atomic(uri, self.to_yaml())


# ---- generic helpers --------------------------------------------------------------------------------

def _copy(d):
    if isinstance(d, dict):
        return {k: _copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_copy(v) for v in d]
    return d


def apply_override(d: dict, item: str) -> None:
    """``"optim.lr=3e-3"`` -> ``d["optim"]["lr"] = 3e-3`` (value parsed as YAML)."""
    import yaml

    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {item!r}: empty key part")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {p} is not a section")
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):  # YAML 1.1 reads 3e-3 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    node[parts[-1]] = value


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(d).__name__}")
    if cls is DataConfig:
        try:
            return DataConfig.from_dict(d)
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc) if str(exc).startswith("data.") else f"data: {exc}") from None
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown field(s) {[prefix + u for u in unknown]}; valid: {sorted(prefix + k for k in known)}")
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if _is_dataclass_type(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check(tp, value, prefix + name)
    missing = [n for n, f in known.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing section(s)/field(s) {[prefix + m for m in missing]}")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if "." in msg.split(" ")[0] else f"{prefix}{msg}") from None


def _check(tp, value, name: str):
    """Light type check (ints accepted for floats); the error names the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(a, value, name)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{name}: bad value {value!r}")
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{name}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {k: _check(vt, v, f"{name}.{k}") for k, v in value.items()}
    return value
