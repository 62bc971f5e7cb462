"""Typed training configuration: pydantic sections (:class:`phantom_ray.config.Config`), YAML, dotted overrides.

A training YAML has the sections ``model``, ``data`` (:class:`phantom_ray.data.pipeline.DataConfig`),
``synth``, ``loss``, ``recipe``, ``optim``, ``deepspeed``, ``scaling`` and ``run``; every field has a
default except ``data.shards``. Unknown keys are errors that name the field and the file::

    cfg = TrainConfig.from_yaml("configs/train/tiny-cpu.yaml", overrides=["optim.lr=3e-3", "run.max_steps=20"])
    cfg = cfg.resolved()                        # relative paths -> absolute, against the launch directory
    cfg.save("runs/x/train_config.yaml")       # written next to every checkpoint and export

The model is named once, in ``model`` (``init_from``, else ``preset``); the data side (its processor
and tokenizer) is derived from it, so ``data.model`` is not a field of a training config.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_serializer, field_validator, model_validator

from phantom_ray import storage
from phantom_ray.config import Config, ConfigError, resolve_path
from phantom_ray.data.pipeline import DataConfig

# Peak dense bf16 throughput (FLOP/s) per device, for MFU. Override with run.peak_flops.
KNOWN_PEAK_FLOPS = {
    "H100": 989e12,    # H100 SXM bf16 dense
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


class ModelSection(Config):
    preset: str = "tiny-qwen2"               # PhantomConfig preset (random init unless init_from is set)
    init_from: str | None = None             # HF-layout checkpoint dir / s3:// URI (step 2: step 1's export)
    attn_implementation: Literal["eager", "sdpa", "flash"] = "sdpa"  # flash falls back to sdpa without it
    phantom_eta: float | None = None         # None: the preset's value
    gradient_checkpointing: bool = False     # activation checkpointing per decoder layer

    def model_id(self) -> str:
        """The one name of the model: its checkpoint when given, else the preset."""
        return self.init_from or self.preset


class LossSection(Config):
    kind: Literal["po", "sft", "dpo"] = "po"  # po (SFT + SimPO-style preference) | sft | dpo (reference precomputed)
    beta: float = Field(2.0, gt=0)            # reward scale (SimPO's range; the paper gives none)
    gamma: float = 1.0                        # target reward margin
    pref_weight: float = Field(1.0, ge=0)     # weight of the preference term
    sft_weight: float = Field(1.0, ge=0)      # weight of the SFT term on the chosen answer
    reference: str | None = None              # dpo: reference model (checkpoint / preset); default model.init_from
    chunk_tokens: int = Field(256, ge=1)      # answer tokens per chunk of the fused head + log-softmax
    fused_head: bool = True                   # the LM head applied inside the chunked loss (no logits tensor, any
                                              # ZeRO stage); false: the model returns logits and the loss chunks those


class LoraSection(Config):
    enabled: bool = False     # step 2 only; needs `peft` (the lora extra)
    r: int = Field(16, ge=1)
    alpha: int = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    vision: bool = False      # also adapt the vision tower's attention (qkv, proj) and MLP (fc1, fc2)
    merge_on_export: bool = True  # export merged full weights; false: base weights + adapter/ (peft layout)


class RecipeSection(Config):
    step: Literal[1, 2] = 1          # 1: vision_proj + phantom modules only; 2: everything
    freeze_vision: bool = False      # step 2: keep the vision encoder frozen
    lora: LoraSection = Field(default_factory=LoraSection)

    @model_validator(mode="after")
    def _lora_step(self):
        _check(not (self.lora.enabled and self.step != 2),
               "recipe.lora.enabled needs recipe.step=2 (step 1 trains no LLM weights)")
        return self


class OptimSection(Config):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = 0.0
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0           # 0 disables clipping
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step


class DeepSpeedSection(Config):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    offload_optimizer: bool = False  # ZeRO-Offload (uses DeepSpeedCPUAdam)
    extra: dict[str, Any] = Field(default_factory=dict)  # merged into the generated DeepSpeed config


class ScalingSection(Config):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = 0.5     # fractional on small machines, or Ray Data starves (STACK_NOTES)
    gpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] | None = None  # overrides the two above when given

    def resources(self) -> dict[str, float]:
        if self.resources_per_worker is not None:
            return dict(self.resources_per_worker)
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res


class RunSection(Config):
    name: str = "phantom-train"
    storage_path: str = "runs"       # local dir or s3://bucket/prefix (Ray Train RunConfig.storage_path)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps in all; None: epochs x steps per epoch
    checkpoint_every: int = Field(50, ge=1)    # optimizer steps; a checkpoint is also written at the end
    report_every: int = Field(10, ge=1)        # optimizer steps between metric reports (curves, stdout)
    val_every: int | None = Field(None, ge=1)  # optimizer steps between validations on data.val_shards
    tracking: Literal["tensorboard", "mlflow", "none"] = "tensorboard"  # curves written by rank 0
    mlflow_tracking_uri: str | None = None     # tracking=mlflow: default <run dir>/mlruns
    max_failures: int = Field(2, ge=0)         # group restarts from the latest checkpoint after a lost worker
    num_to_keep: int | None = 2      # checkpoints kept by Ray Train
    export: str | None = None        # consolidated HF-layout model; default <storage>/<name>/export
    seed: int = 0
    peak_flops: float | None = None  # per device for MFU; default: known GPU peak, none on CPU

    def run_dir(self) -> str:
        """Where the run's checkpoints, curves (tensorboard/, metrics.jsonl) and export live."""
        return storage.join(self.storage_path, self.name)

    def export_uri(self) -> str:
        return self.export or storage.join(self.run_dir(), "export")


class SynthSection(Config):
    """Smoke runs only: write and pack the synthetic shapes corpus to ``data.shards`` when it has no
    manifest yet (``phantom-ray data synth`` + ``data pack``); 1 in ``heldout_every`` goes to a
    held-out set (the synth default), which validation scores when ``data.val_shards`` is unset."""

    enabled: bool = False
    num_samples: int = 512
    layout: Literal["triples", "llava"] = "triples"  # triples for PO; llava for SFT
    image_size: int = 32
    seed: int = 0


def _local_like(value: str) -> bool:
    """A model reference that is a local path (resolve it) rather than a preset or hub id."""
    return value.startswith((".", "/", "~")) or os.path.exists(value)


class TrainConfig(Config):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              arbitrary_types_allowed=True)

    data: DataConfig
    synth: SynthSection = Field(default_factory=SynthSection)
    model: ModelSection = Field(default_factory=ModelSection)
    loss: LossSection = Field(default_factory=LossSection)
    recipe: RecipeSection = Field(default_factory=RecipeSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)

    @model_validator(mode="before")
    @classmethod
    def _data_from_model(cls, values):
        # data.model (the processor/tokenizer) is derived from the model section: named once
        if isinstance(values, dict) and isinstance(values.get("data"), dict):
            data = dict(values["data"])
            if "model" in data:
                raise ValueError("data.model is not a training field: the processor follows model.init_from "
                                 "(or model.preset); remove data.model")
            m = values.get("model") or {}
            m = m if isinstance(m, dict) else m.model_dump() if hasattr(m, "model_dump") else {}
            data["model"] = m.get("init_from") or m.get("preset") or ModelSection().preset
            values = {**values, "data": data}
        return values

    @field_validator("data", mode="before")
    @classmethod
    def _data(cls, v):
        if isinstance(v, DataConfig):
            return v
        if not isinstance(v, dict):
            raise ValueError(f"expected a mapping, got {type(v).__name__}")
        return DataConfig.from_dict(v)

    @field_serializer("data")
    def _data_out(self, v: DataConfig):
        d = v.to_dict()
        d.pop("model", None)  # derived
        return d

    @model_validator(mode="after")
    def _cross(self):
        if self.loss.kind in ("po", "dpo") and self.data.task != "po":
            raise ValueError(f"loss.kind={self.loss.kind!r} needs data.task='po' (chosen/rejected pairs), "
                             f"got data.task={self.data.task!r}")
        return self

    @classmethod
    def load(cls, path: str, overrides=()) -> "TrainConfig":
        return cls.from_yaml(path, overrides)

    def resolved(self, base: str | None = None) -> "TrainConfig":
        """A copy with every relative local path absolute against ``base`` (default: the current
        directory, where the user launched). Call on the driver BEFORE handing the config to Ray:
        Ray runs its workers in its session folder, where a relative path means something else."""
        d = self.to_dict()
        data, run, model, loss = d["data"], d["run"], d["model"], d["loss"]
        data["shards"] = [resolve_path(x, base) for x in data["shards"]]
        if data.get("val_shards"):
            data["val_shards"] = [resolve_path(x, base) for x in data["val_shards"]]
        data["errors_output"] = resolve_path(data.get("errors_output"), base)
        run["storage_path"] = resolve_path(run["storage_path"], base)
        run["export"] = resolve_path(run.get("export"), base)
        if run.get("mlflow_tracking_uri") and "://" not in run["mlflow_tracking_uri"]:
            run["mlflow_tracking_uri"] = resolve_path(run["mlflow_tracking_uri"], base)
        for sec, key in ((model, "init_from"), (loss, "reference")):
            if sec.get(key) and _local_like(sec[key]):
                sec[key] = resolve_path(sec[key], base)
        return type(self).from_dict(d)

