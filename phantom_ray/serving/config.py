"""Typed arguments of the Serve application (``build_app(args)``), in the one config style
(:class:`phantom_ray.config.Config`: strict fields, YAML, dotted overrides).

The ``args`` block of a Serve config file (``serve/local-cpu.yaml``, ``serve/gpu-cluster.yaml``,
the RayService ``serveConfigV2``) is validated here when the application is built: a misspelt or
out-of-range field fails the deploy with a message that names it, instead of a replica crashing.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from phantom_ray.config import Config

from phantom_ray.ingest import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, parse_allow_entry

# Model names become part of Serve deployment names and appear in URLs' JSON bodies: keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelSpec(Config):
    """One served model: its checkpoint, how a replica loads it, and how Serve scales it."""

    name: str = Field(description="the `model` field requests use to pick this model")
    checkpoint: str = Field(description="a preset name (random weights), a local directory or an s3:// prefix")
    engine: Literal["auto", "torch", "vllm"] = Field(
        "auto", description="generation backend (phantom_ray.infer.api.load_engine): auto = vllm where installed")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["eager", "sdpa", "flash"] = "sdpa"
    # replica resources; fractional GPUs let small models share a card
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, gt=0)
    torch_num_threads: int | None = Field(None, ge=1, description="intra-op threads per replica (CPU)")
    # Serve request limits: a replica holds at most max_ongoing_requests; max_queued_requests more wait
    # in each caller's handle, beyond that the API answers 503 (None: 2 x max_ongoing_requests, -1: unbounded)
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int | None = Field(None, ge=-1)
    # the torch engine's dynamic batching inside a replica (the vLLM engine batches continuously:
    # its own max_num_seqs / max_num_batched_tokens below)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10)
    # fixed replica count or Serve autoscaling (exactly one of them may be set)
    num_replicas: int | None = Field(None, ge=1)
    autoscaling_config: dict[str, Any] | None = None
    # request limits
    max_prompt_tokens: int = Field(8192, ge=16, description="prompt length limit, image tokens included")
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1)
    seed: int = Field(0, description="weight init seed when checkpoint is a preset (tests, smoke runs)")
    # engine "vllm" only (vLLM's engine arguments; None: the engine's default). The replica's vLLM
    # engine core runs in its own process with the replica's environment (runtime_env env_vars).
    max_model_len: int | None = Field(None, ge=16, description="vLLM context length (prompt + output); "
                                      "None: max_prompt_tokens, capped by the model's positions")
    kv_cache_memory_bytes: int | None = Field(None, ge=1, description="vLLM KV cache size in bytes; on CPU the "
                                              "engine reserves 512 MiB when neither this nor the fraction is set")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="vLLM: fraction of the GPU's "
                                                 "memory for weights + KV cache (of this replica's share)")
    # vLLM's own concurrency settings (None: what vLLM picks for the device, e.g. 1024 sequences and
    # 8192 batched tokens on an H100 for a server, 128 / 2048 on CPU). A replica also never holds
    # more than max_ongoing_requests requests (x n choices), so size that to the sequences wanted.
    max_num_seqs: int | None = Field(None, ge=1, description="vLLM: most sequences in one engine step")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="vLLM: most tokens (prefill + decode) "
                                               "in one engine step")
    block_size: int | None = Field(None, ge=1, description="vLLM KV cache block size in tokens (CPU: a "
                                   "multiple of 32)")
    enable_prefix_caching: bool = True
    enforce_eager: bool | None = Field(None, description="vLLM: no CUDA graphs; None: eager on CPU only")
    vllm_options: dict[str, Any] = Field(default_factory=dict, description="further vLLM engine arguments, "
                                         "passed unchanged (e.g. max_num_batched_tokens)")
    env_vars: dict[str, str] = Field(default_factory=dict, description="environment of this model's replicas "
                                     "(and of their vLLM engine-core process), e.g. VLLM_CPU_OMP_THREADS_BIND")

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"model name {v!r} must be 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("checkpoint")
    @classmethod
    def _check_checkpoint(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("checkpoint must not be empty")
        return v

    @field_validator("autoscaling_config")
    @classmethod
    def _check_autoscaling(cls, v):
        if v is not None:
            from ray.serve.config import AutoscalingConfig

            AutoscalingConfig(**v)  # Ray's own validation (min <= max, known fields)
        return v

    @model_validator(mode="after")
    def _check_consistency(self) -> "ModelSpec":
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError(f"model {self.name!r}: set num_replicas or autoscaling_config, not both")
        # set to anything but their defaults (a replica re-validates the full dump of its spec)
        given = [f for f in ("max_batch_size", "batch_wait_timeout_s")
                 if getattr(self, f) != type(self).model_fields[f].default]
        if self.engine == "vllm" and given:
            raise ValueError(f"model {self.name!r}: {', '.join(given)} only apply to engine torch (its dynamic "
                             f"batching); the vllm engine batches continuously: set max_num_seqs / "
                             f"max_num_batched_tokens (None: vLLM's defaults for the device)")
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError(
                f"model {self.name!r}: max_batch_size={self.max_batch_size} exceeds max_ongoing_requests="
                f"{self.max_ongoing_requests}; a replica never holds enough requests to fill such a batch"
            )
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"model {self.name!r}: default_max_tokens > max_tokens_limit")
        if self.kv_cache_memory_bytes is not None and self.gpu_memory_utilization is not None:
            raise ValueError(f"model {self.name!r}: set kv_cache_memory_bytes or gpu_memory_utilization, not both")
        if self.engine == "torch":
            vllm_only = [f for f in ("max_model_len", "kv_cache_memory_bytes", "gpu_memory_utilization", "block_size",
                                     "enforce_eager", "max_num_seqs", "max_num_batched_tokens")
                         if getattr(self, f) is not None]
            if self.vllm_options:
                vllm_only.append("vllm_options")
            if vllm_only:
                raise ValueError(f"model {self.name!r}: {', '.join(vllm_only)} only apply to engine vllm "
                                 f"(this model has engine torch)")
        return self

    @property
    def is_preset(self) -> bool:
        from phantom_ray.model.config import PRESETS

        return self.checkpoint in PRESETS

    @property
    def queue_limit(self) -> int:
        if self.max_queued_requests is None:
            return 2 * self.max_ongoing_requests
        return self.max_queued_requests

    def engine_options(self) -> dict[str, Any]:
        """The vLLM engine's options of this model (``VLLMEngine.load`` keywords)."""
        opts: dict[str, Any] = {
            "enable_prefix_caching": self.enable_prefix_caching,
            "vllm_options": dict(self.vllm_options),
            "served_model_name": self.name,  # the model_name label of vLLM's metrics
        }
        for f in ("max_model_len", "kv_cache_memory_bytes", "gpu_memory_utilization", "enforce_eager", "max_num_seqs",
                  "max_num_batched_tokens"):
            if getattr(self, f) is not None:
                opts[f] = getattr(self, f)
        if self.block_size is not None:
            opts["vllm_options"]["block_size"] = self.block_size
        return opts

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options`` for this model's replicas."""
        opts: dict[str, Any] = {
            "name": deployment_name(self.name),
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.queue_limit,
        }
        if self.env_vars:
            # merged by Serve over the application's runtime_env env_vars
            opts["ray_actor_options"]["runtime_env"] = {"env_vars": dict(self.env_vars)}
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts


class ServeArgs(Config):
    """The whole application: the models and the HTTP front's request policy."""

    models: list[ModelSpec] = Field(min_length=1)
    # name of the environment variable holding accepted API keys (comma-separated); None or an unset /
    # empty variable means no authentication. The keys themselves never appear in a config file.
    api_keys_env: str | None = None
    # image_url values other than data: URIs must start with one of these (e.g. "s3://bucket/",
    # "https://images.example.com/"); empty: only inline data: URIs are accepted
    allowed_image_url_prefixes: list[str] = Field(default_factory=list)
    max_images_per_request: int = Field(4, ge=0)
    # image limits default to the one set every entry point uses (phantom_ray.ingest.ImageLimits)
    max_image_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1)
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    # None: sized to the largest legitimate request (max_images_per_request base64 images of
    # max_image_bytes plus the longest prompt text, JSON-escaped); see Frontend.max_body_bytes
    max_request_bytes: int | None = Field(None, ge=1)
    image_fetch_timeout_s: float = Field(10.0, gt=0)
    # image URLs that resolve to loopback/private addresses are refused unless this is set (for an
    # image server inside the cluster's network); link-local/metadata addresses are always refused
    allow_private_image_hosts: bool = False
    ingress_num_cpus: float = Field(0.25, gt=0)
    ingress_num_replicas: int = Field(1, ge=1)
    # streaming responses hold an ingress slot for their whole generation: keep this well above the
    # sum of the models' max_ongoing_requests (Serve's default of 5 would cap every batch at 5)
    ingress_max_ongoing_requests: int = Field(1024, ge=1)

    @field_validator("allowed_image_url_prefixes")
    @classmethod
    def _check_prefixes(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith(("s3://", "http://", "https://")):
                raise ValueError(f"allowed_image_url_prefixes entry {p!r} must start with s3://, http:// or https://")
            if p in ("s3://", "http://", "https://"):
                raise ValueError(f"allowed_image_url_prefixes entry {p!r} would allow every host; name one")
            try:  # the same normalisation the fetch applies (host case, IDNA, ports, dot segments)
                parse_allow_entry(p)
            except ValueError as exc:  # FetchError is a ValueError
                raise ValueError(f"allowed_image_url_prefixes entry {p!r} is not a valid prefix: {exc}") from None
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> "ServeArgs":
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique, repeated: {dup}")
        return self

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def deployment_name(model_name: str) -> str:
    return f"PhantomModel-{model_name}"


def parse_args(args: dict | ServeArgs) -> ServeArgs:
    """Validate ``args`` (the dict of a Serve config's ``args`` block)."""
    if isinstance(args, ServeArgs):
        return args
    return ServeArgs.model_validate(args)
