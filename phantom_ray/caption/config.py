"""``CaptionConfig``: everything one captioning run needs (the CLI flags map 1:1 onto its fields)."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import field_validator, model_validator

from phantom_ray import storage
from phantom_ray.config import Config
from phantom_ray.infer.api import SamplingParams

DEFAULT_PROMPT = "Describe the image in detail."
FORMATS = ("parquet", "jsonl")
# the columns a captioning run adds to every input row
ADDED_COLUMNS = ("caption", "prompt", "prompt_tokens", "generated_tokens", "finish_reason", "latency_s",
                 "error", "error_detail")


class CaptionConfig(Config):
    """Everything a captioning run needs; the CLI flags map 1:1 onto these fields. ``input`` and
    ``output`` are canonicalised (and a local ``model`` path made absolute) once, here, on the
    driver, before anything reaches Ray."""

    input: str
    output: str
    model: str
    prompt: str = DEFAULT_PROMPT
    prompt_column: str | None = None     # manifest column holding each row's prompt
    image_column: str | None = None      # manifest column holding the image URI (default: detected)
    sampling: SamplingParams = SamplingParams(max_tokens=128)
    engine: Literal["auto", "torch", "vllm"] = "auto"
    batch_size: int = 8                  # images per generate call (torch); vllm: >= 256 in flight per chunk
    min_replicas: int = 1                # autoscaling actor pool bounds
    max_replicas: int | None = None      # None: what the cluster can grow to (phantom_ray.runtime.max_replicas)
    num_gpus: float | None = None        # per replica; fractional shares a GPU; None: 1 if the cluster has GPUs
    num_cpus: float = 1.0                # per replica
    io_threads: int = 8                  # per replica: threads fetching and opening images ahead of the model
    format: Literal["parquet", "jsonl"] = "parquet"
    shard_size: int = 1000               # rows per chunk = per output shard
    list_page_size: int = 1000           # keys per S3 listing request
    max_pixels: int | None = None        # None: the ingest default (phantom_ray.ingest.ImageLimits)
    max_image_bytes: int | None = None   # None: the ingest default
    dtype: str = "auto"                  # auto: bfloat16 on GPU, float32 on CPU
    attn_implementation: str = "sdpa"
    seed: int = 0                        # preset weights
    max_length: int = 4096
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, what in (("input", "give a prefix/directory of images or a manifest (parquet/JSONL/CSV)"),
                           ("output", "give a local directory or s3://bucket/prefix for the caption shards"),
                           ("model", "give a preset name, a checkpoint directory or an s3:// checkpoint")):
            if not data.get(name):
                raise ValueError(f"{name}: {what}")
        data["input"] = storage.canonical_uri(data["input"])
        data["output"] = storage.canonical_uri(data["output"])
        model = str(data["model"])
        if "://" not in model and (os.path.exists(model) or model.startswith((".", "/", "~"))):
            from phantom_ray.config import resolve_path

            data["model"] = resolve_path(model)  # a local checkpoint; presets and hub ids stay names
        if isinstance(data.get("sampling"), dict):
            data["sampling"] = SamplingParams.from_dict(data["sampling"])
        return data

    @field_validator("batch_size", "shard_size", "min_replicas", "max_replicas", "io_threads", "list_page_size")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("num_cpus")
    @classmethod
    def _cpus(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("num_gpus")
    @classmethod
    def _gpus(cls, v: float | None) -> float | None:
        if v is not None and v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _replicas(self) -> "CaptionConfig":
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.engine == "vllm" and self.sampling.num_beams > 1:  # refused before Ray starts
            from phantom_ray.infer.api import resolve_backend

            resolve_backend(self.engine, self.sampling.num_beams, "caption")
        return self

    def job_record(self) -> dict[str, Any]:
        """What must match for a re-run to extend an existing output (recorded in ``_job.json``)."""
        return {"input": self.input, "model": self.model, "prompt": self.prompt,
                "prompt_column": self.prompt_column, "image_column": self.image_column,
                "sampling": self.sampling.to_dict(), "format": self.format, "shard_size": self.shard_size}



__all__ = ["CaptionConfig", "DEFAULT_PROMPT", "FORMATS", "ADDED_COLUMNS"]
