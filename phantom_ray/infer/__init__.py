"""Inference: the one engine interface, the engine core its backends compose, and the torch backend.

    from phantom_ray.infer import load_engine, Request, SamplingParams      # the engine (api.py)

* ``api.py``: the interface (``SamplingParams``, ``Request``, ``Generation``, ``Event``, ``Engine``)
  and backend selection (``load_engine``, the name -> ``module:Class`` registry ``ENGINES``);
* ``core.py``: what every backend composes (the per-request ``TextStream``, results, error events);
* ``torch_engine.py``: the ``torch`` backend (our model, the numerical reference).

The ``vllm`` backend lives with the vLLM model (``phantom_ray.vllm.engine``) and is found by name;
infer never imports vllm. Batch captioning is ``phantom_ray.caption``, eval's generation stages are
``phantom_ray.eval``; both sit above infer. Importing the interface imports neither torch nor Ray.
"""

from phantom_ray.infer.api import (BACKENDS, ENGINES, Engine, Event, Generation, Request, SamplingParams,
                                   default_backend, load_engine)

__all__ = ["BACKENDS", "ENGINES", "Engine", "Event", "Generation", "Request", "SamplingParams", "default_backend",
           "load_engine", "TorchEngine"]


def __getattr__(name):
    # lazy, so that importing the interface does not import torch models
    import importlib

    if name == "TorchEngine":
        return importlib.import_module("phantom_ray.infer.torch_engine").TorchEngine
    raise AttributeError(f"module 'phantom_ray.infer' has no attribute {name!r}")
