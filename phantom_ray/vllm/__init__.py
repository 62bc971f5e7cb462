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
    _tolerate_proxy_objects_in_kernel_scan()


def _hasattr_or_false(obj, name: str) -> bool:
    try:
        return hasattr(obj, name)
    except Exception:  # noqa: BLE001 - see _tolerate_proxy_objects_in_kernel_scan
        return False


def _tolerate_proxy_objects_in_kernel_scan() -> None:
    """vLLM's CPU platform rebinds Triton kernels by scanning every module namespace in the process
    with ``hasattr(value, "__dict__")`` (``vllm.triton_utils.dispatcher._rebind_kernels``). An object
    whose attribute access raises something other than AttributeError (werkzeug's unbound
    ``LocalProxy``, e.g. ``flask.request`` once flask is imported anywhere in the process) makes
    engine start-up fail with "Working outside of application context". Giving that module a
    ``hasattr`` that answers False for such objects keeps the scan's meaning for everything else."""
    try:
        from vllm.triton_utils import dispatcher
    except ImportError:  # a vLLM without the scan
        return
    dispatcher.hasattr = _hasattr_or_false
