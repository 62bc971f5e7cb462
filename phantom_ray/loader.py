"""The one way from a model id to a ready model, tokenizer and processor.

A model id is one of:

* a preset name (``tiny-qwen2``, ``phantom-0.5b``, ...): randomly initialised weights seeded by
  ``seed`` (a warning says so) and, for ``tiny-*``, the tiny tokenizer built locally;
* a local directory in Hugging Face layout (``config.json``, safetensors, tokenizer files);
* an ``s3://bucket/prefix`` holding such a directory (downloaded once per node into the cache);
* a hub id (``BK-Lee/Phantom-0.5B``) where the network allows (downloaded by ``huggingface_hub``).

Every download lands under one cache root, :func:`phantom_ray.model.loading.cache_root`
(``$PHANTOM_RAY_CACHE``, default ``~/.cache/phantom_ray``). Serving, captioning, eval, training-time
evaluation, the quickstart and the engines all call :func:`load_model` (weights) or
:func:`load_processor` (config + tokenizer only, for CPU preprocessing stages) or
:func:`load_weights` (the model alone, e.g. a frozen DPO reference);
:func:`local_model_dir` gives a directory for any id (what vLLM needs), writing a preset's random
weights and tiny tokenizer there once.

    loaded = load_model("tiny-qwen2", device="cpu")
    loaded.model, loaded.tokenizer, loaded.processor, loaded.local_dir
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class ModelNotFoundError(FileNotFoundError):
    """A model id that names no preset, directory, S3 checkpoint or reachable hub repository."""


@dataclass
class Loaded:
    model: Any            # PhantomForCausalLM, in eval mode, on its device
    tokenizer: Any
    processor: Any        # PhantomProcessor
    model_id: str
    local_dir: Path | None  # the checkpoint directory (None for a preset loaded in memory)


def is_preset(model_id: str) -> bool:
    from phantom_ray.model import list_presets

    return str(model_id) in set(list_presets())


def default_device(num_gpus: float = 1.0) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype | None:
    """``"auto"``: bfloat16 on CUDA, float32 on CPU; None keeps the checkpoint's dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    out = getattr(torch, str(dtype), None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return out


def resolve_model_dir(model_id: str) -> Path:
    """A local checkpoint directory for a directory, ``s3://`` prefix or hub id (not a preset);
    raises :class:`ModelNotFoundError` with one line naming the id and what was tried."""
    from phantom_ray.model.loading import resolve_checkpoint

    try:
        return resolve_checkpoint(str(model_id))
    except (FileNotFoundError, NotADirectoryError, OSError) as exc:
        if isinstance(exc, ModelNotFoundError):
            raise
        raise ModelNotFoundError(f"model {model_id!r} not found: {exc}") from exc


def _warn_preset(model_id: str, seed: int) -> None:
    # stacklevel 3: the caller of load_model / load_engine sees the warning as its own line
    warnings.warn(f"model {model_id!r} is a preset name: randomly initialised weights (seed {seed}); "
                  "outputs are noise. Pass a checkpoint directory or s3:// URI for real output.", stacklevel=3)


def _processor(config, tokenizer, max_length: int, max_pixels: int | None):
    from phantom_ray.processing import PhantomProcessor

    kw = {"max_pixels": max_pixels} if max_pixels is not None else {}
    return PhantomProcessor(config, tokenizer, max_length=max_length, **kw)


def load_weights(model_id: str, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = "auto", attn_implementation: str = "sdpa",
                 seed: int = 0):
    """The model alone (no tokenizer needed: a frozen reference model, a checkpoint of weights
    only), in eval mode on ``device``; returns ``(model, local_dir)`` (``None`` for a preset)."""
    from phantom_ray.model import PhantomForCausalLM

    model_id = str(model_id)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if is_preset(model_id):
        _warn_preset(model_id, seed)
        model = PhantomForCausalLM.from_preset(model_id, attn_implementation=attn_implementation, seed=seed)
        local = None
    else:
        local = resolve_model_dir(model_id)
        model = PhantomForCausalLM.from_pretrained(str(local), dtype=torch_dtype,
                                                   attn_implementation=attn_implementation, device="cpu")
        model.name_or_path = model_id
    if torch_dtype is not None:
        model = model.to(dtype=torch_dtype)
    return model.to(device).eval(), local


def load_model(model_id: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = "auto",
               attn_implementation: str = "sdpa", seed: int = 0, max_length: int = 4096,
               max_pixels: int | None = None) -> Loaded:
    """Model + tokenizer + processor for ``model_id`` (see the module docstring)."""
    from phantom_ray.processing import load_tokenizer

    model, local = load_weights(model_id, device=device, dtype=dtype, attn_implementation=attn_implementation,
                                seed=seed)
    tokenizer = load_tokenizer(str(model_id) if local is None else str(local), model.config)
    return Loaded(model, tokenizer, _processor(model.config, tokenizer, max_length, max_pixels), str(model_id), local)


def load_config(model_id: str, **config_overrides):
    """The model's :class:`PhantomConfig` without its weights (config.json only for S3 ids)."""
    from phantom_ray import storage
    from phantom_ray.model import PhantomConfig

    model_id = str(model_id)
    if is_preset(model_id):
        return PhantomConfig.from_preset(model_id, **config_overrides)
    if storage.is_s3(model_id):
        try:
            raw = json.loads(storage.read_text(storage.join(model_id, "config.json")))
        except (FileNotFoundError, OSError) as exc:
            raise ModelNotFoundError(f"model {model_id!r} not found: no config.json under it ({exc})") from exc
    else:
        raw = json.loads((resolve_model_dir(model_id) / "config.json").read_text())
    config = PhantomConfig.from_dict(raw)
    for k, v in config_overrides.items():
        setattr(config, k, v)
    return config


@functools.lru_cache(maxsize=8)
def load_processor(model_id: str, max_length: int = 4096, max_pixels: int | None = None, **config_overrides):
    """The model's processor without its weights (config.json + tokenizer files only); cached per
    process, so a CPU preprocessing task pays for the tokenizer once."""
    from phantom_ray.processing import load_tokenizer

    config = load_config(model_id, **config_overrides)
    return _processor(config, load_tokenizer(str(model_id), config), max_length, max_pixels)


def local_model_dir(model_id: str, seed: int = 0) -> Path:
    """A local HF-layout directory (config.json, model.safetensors, tokenizer files) for any id.

    For a preset the random-init weights (seeded by ``seed``) and its tokenizer are written once
    into ``<cache>/presets/<preset>-seed<seed>`` (with the chat template, like every export); engines that need files (vLLM) read them there."""
    from phantom_ray.model.loading import cache_root

    model_id = str(model_id)
    if not is_preset(model_id):
        return resolve_model_dir(model_id)
    dest = cache_root() / "presets" / f"{model_id}-seed{seed}"
    if (dest / ".complete").exists() and (dest / "chat_template.jinja").exists():
        return dest
    from phantom_ray.model import PhantomForCausalLM
    from phantom_ray.processing import load_tokenizer, tokenizer_files

    _warn_preset(model_id, seed)
    model = PhantomForCausalLM.from_preset(model_id, seed=seed)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), extra_files=tokenizer_files(load_tokenizer(model_id, model.config), model.config))
    (tmp / ".complete").write_text(model_id)
    # another process may have finished first: either copy is the same bytes, keep theirs
    if (dest / ".complete").exists() and not (dest / "chat_template.jinja").exists():
        # written before exports carried a chat template: replace it
        shutil.rmtree(dest, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / ".complete").exists():
            raise
    return dest


__all__ = ["Loaded", "ModelNotFoundError", "default_device", "is_preset", "load_config", "load_model",
           "load_processor", "load_weights", "local_model_dir", "resolve_dtype", "resolve_model_dir"]
