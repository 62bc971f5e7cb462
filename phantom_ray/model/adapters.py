"""LoRA adapters saved next to a checkpoint, in peft's standard layout, applied at load time (pure torch).

A training export with ``recipe.lora.merge_on_export: false`` is a normal HF-layout directory (the
weights the adapters were trained on top of: frozen base linears plus the fully trained phantom
modules and ``vision_proj``) with, next to it, what ``peft.PeftModel.save_pretrained`` writes:

* ``adapter_config.json``: a ``peft.LoraConfig`` (``peft_type: LORA``, ``r``, ``lora_alpha``,
  ``target_modules`` as a regex over the module names of :class:`PhantomForCausalLM`);
* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r, in) and
  ``...lora_B.weight`` (out, r) per adapted ``nn.Linear``.

``peft.PeftModel.from_pretrained(model, dir)`` loads it on a model loaded with ``adapter="skip"``.
Every loader of ours (the torch model's ``from_pretrained``, hence the torch engine, serving,
captioning and eval; the vLLM model's ``load_weights``) merges it into the weights instead,
``W + lora_alpha / r * B @ A`` in fp32 (:func:`merge_lora_weight`, the same arithmetic the merged
export uses), so a directory with an adapter never loads as its base model. peft is not needed for that.
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's module names
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter next to a checkpoint that cannot be applied as written."""


def has_adapter(directory: str | os.PathLike) -> bool:
    return os.path.exists(os.path.join(str(directory), ADAPTER_CONFIG))


def lora_scaling(config: dict) -> float:
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r


def merge_lora_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling * B @ A`` computed in fp32 (at least), returned in ``weight``'s dtype. The one
    merge: the merged export and every load of an unmerged export go through it."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    delta = lora_b.to(acc) @ lora_a.to(acc)
    return (weight.to(acc) + scaling * delta).to(weight.dtype)


def _check_supported(config: dict, where: str) -> None:
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA; only LoRA adapters load here")
    unsupported = {k: config.get(k) for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                                              "modules_to_save") if config.get(k)}
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise AdapterError(f"{where}: adapter options {unsupported} are not supported by the merge-at-load path; "
                           f"merge with peft (PeftModel.merge_and_unload) and save the merged weights")


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(adapter config, {module name: (lora_A, lora_B)})`` of the adapter in ``directory``."""
    from safetensors.torch import load_file

    directory = str(directory)
    cfg_path, w_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    with open(cfg_path) as f:
        config = json.load(f)
    _check_supported(config, cfg_path)
    if not os.path.exists(w_path):
        raise AdapterError(f"{directory}: {ADAPTER_CONFIG} without {ADAPTER_WEIGHTS}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(w_path).items():
        m = _LORA_KEY.match(key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key)
        if m is None:
            raise AdapterError(f"{w_path}: unexpected tensor {key!r} (expected <module>.lora_A/lora_B.weight)")
        pairs.setdefault(m["module"], {})[m["ab"]] = value
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{w_path}: module {module} has lora_{''.join(ab)} only")
        out[module] = (ab["A"], ab["B"])
    if not out:
        raise AdapterError(f"{w_path}: no LoRA tensors")
    return config, out


def adapter_deltas(directory: str | os.PathLike) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """``(config, {"<module>.weight": (A, B)}, scaling)``: what to merge into which weight."""
    config, pairs = read_adapter(directory)
    return config, {f"{m}.weight": ab for m, ab in pairs.items()}, lora_scaling(config)


def merge_adapter_into(sd: dict[str, torch.Tensor], directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Merge the adapter saved in ``directory`` into the state dict ``sd`` (in place; returned)."""
    config, deltas, scaling = adapter_deltas(directory)
    missing = sorted(k for k in deltas if k not in sd)
    if missing:
        raise AdapterError(f"{directory}: the adapter adapts modules the checkpoint does not have: {missing[:5]}")
    for key, (a, b) in deltas.items():
        w = sd[key]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise AdapterError(f"{directory}: adapter for {key} is {tuple(b.shape[:1]) + tuple(a.shape[1:])}, "
                               f"the weight is {tuple(w.shape)}")
        sd[key] = merge_lora_weight(w, a, b, scaling)
    log.info("%s: merged LoRA adapter (r=%s, alpha=%s) into %d weights", directory, config.get("r"),
             config.get("lora_alpha"), len(deltas))
    return sd
