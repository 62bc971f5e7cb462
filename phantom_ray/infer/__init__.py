"""Inference: the one engine interface, its torch backend, and the Ray Data batch captioning pipeline.

    from phantom_ray.infer import load_engine, Request, SamplingParams      # the engine (api.py)
    from phantom_ray.infer.caption import caption, CaptionConfig           # Ray Data job over a bucket of images

Eval's predict functions live in ``phantom_ray.eval.predict`` (eval sits above infer). Ray is
imported lazily (by ``caption``), so importing the engine does not import Ray.
"""

from phantom_ray.infer.api import (BACKENDS, Engine, Event, Generation, Request, SamplingParams, default_backend,
                                   load_engine)

__all__ = ["BACKENDS", "Engine", "Event", "Generation", "Request", "SamplingParams", "default_backend", "load_engine",
           "TorchEngine", "CaptionConfig", "DEFAULT_PROMPT"]


def __getattr__(name):
    # lazy, so that importing the interface does not import torch models or the pipeline module
    # (``caption`` is the submodule's name: its function is phantom_ray.infer.caption.caption)
    import importlib

    if name == "TorchEngine":
        return importlib.import_module("phantom_ray.infer.torch_engine").TorchEngine
    if name in ("CaptionConfig", "DEFAULT_PROMPT"):
        return getattr(importlib.import_module("phantom_ray.infer.caption"), name)
    raise AttributeError(f"module 'phantom_ray.infer' has no attribute {name!r}")
