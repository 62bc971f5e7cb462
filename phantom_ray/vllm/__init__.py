"""Phantom as a vLLM model (the production generation engine).

``register()`` is the ``vllm.general_plugins`` entry point (pyproject.toml): every vLLM process,
including the engine core vLLM spawns and the ones Ray's LLM APIs start, calls it before loading a
model, so a Phantom checkpoint directory (``config.json`` with ``model_type: phantom``) loads in
plain ``vllm.LLM(model=dir)``.

* :mod:`phantom_ray.vllm.hf_config`: the ``transformers`` config class vLLM reads ``config.json`` with.
* :mod:`phantom_ray.vllm.model`: the model (our torch modules around vLLM's paged attention) and
  its multimodal processor (our tiling, PIL/numpy only).
* :mod:`phantom_ray.vllm.engine`: ``VLLMEngine``, the ``vllm`` backend of ``phantom_ray.infer.api``.

Nothing here is imported by ``phantom_ray`` unless vLLM is used.
"""

from __future__ import annotations

ARCHITECTURE = "PhantomForCausalLM"


def register() -> None:
    """Register the Phantom config with transformers and the model with vLLM (idempotent)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from phantom_ray.vllm.hf_config import PhantomHFConfig

    try:
        AutoConfig.register("phantom", PhantomHFConfig)
    except ValueError:  # already registered in this process
        pass
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # by name, so the heavy module is imported only when a Phantom model is actually built
        ModelRegistry.register_model(ARCHITECTURE, "phantom_ray.vllm.model:PhantomVLLMForCausalLM")
