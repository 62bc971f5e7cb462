"""LoRA for step 2 (``recipe.lora``): peft adapters on the LLM linears (and optionally the vision
tower's), phantom modules and ``vision_proj`` fully trainable next to them; export either merged
into full weights (``merge_on_export: true``) or as base weights plus, in the same directory,
peft's standard ``adapter_config.json`` + ``adapter_model.safetensors`` (see
:mod:`phantom_ray.model.adapters`: every loader merges it at load time; :func:`load_with_adapter`
keeps it as peft modules).

peft is the ``lora`` extra (``pip install 'phantom-ray[lora]'``); it is imported only when LoRA is on.
"""

from __future__ import annotations

import os
import re

from phantom_ray.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS  # noqa: F401 (re-exported)

VISION_TARGETS = ["qkv", "proj", "fc1", "fc2"]  # InternViT attention and MLP linears


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("recipe.lora.enabled needs `peft`: pip install 'phantom-ray[lora]'") from None
    return peft


def _lora_config(lc, targets: list[str]):
    peft = _peft()
    return peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets)


def wrap_lora(model, lc) -> None:
    """Inject adapters in place; afterwards only adapters, phantom modules and vision_proj train."""
    peft = _peft()
    peft.inject_adapter_in_model(_lora_config(lc, list(lc.target_modules)), model.language_model)
    if lc.vision:
        peft.inject_adapter_in_model(_lora_config(lc, VISION_TARGETS), model.vision_model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or "_phantom" in n or n.startswith("vision_proj."))


def merged_state_dict(model, sd: dict) -> dict:
    """Full weights with every adapter merged (:func:`phantom_ray.model.adapters.merge_lora_weight`,
    the same arithmetic the loaders apply to an unmerged export); adapter keys dropped."""
    from phantom_ray.model.adapters import merge_lora_weight

    out = base_state_dict(sd)
    for k in sd:
        if ".lora_A." in k:
            base, rest = k.split(".lora_A.")
            adapter = rest.split(".")[0]
            out[f"{base}.weight"] = merge_lora_weight(out[f"{base}.weight"], sd[k], sd[f"{base}.lora_B.{adapter}.weight"],
                                                      model.get_submodule(base).scaling[adapter])
    return out


def base_state_dict(sd: dict) -> dict:
    """The base model's weights (peft's ``base_layer`` renamed back), adapters left out."""
    return {k.replace(".base_layer.", "."): v for k, v in sd.items() if "lora_" not in k}


def target_regex(lc) -> str:
    """peft ``target_modules`` as one regex over :class:`PhantomForCausalLM` module names: the
    modules :func:`wrap_lora` adapted (peft's suffix match inside ``language_model`` / ``vision_model``)."""
    def alt(names):
        return "|".join(re.escape(n) for n in names)

    parts = [rf"language_model\.(?:.*\.)?(?:{alt(lc.target_modules)})"]
    if lc.vision:
        parts.append(rf"vision_model\.(?:.*\.)?(?:{alt(VISION_TARGETS)})")
    return "|".join(parts)


def adapter_files(sd: dict, lc) -> dict[str, bytes]:
    """``adapter_config.json`` + ``adapter_model.safetensors`` in peft's standard layout (what
    ``PeftModel.save_pretrained`` writes for a model wrapping :class:`PhantomForCausalLM`)."""
    import tempfile

    from safetensors.torch import save as st_save

    from phantom_ray.model.adapters import PEFT_PREFIX

    peft = _peft()
    adapters = {}
    for k, v in sd.items():
        if "lora_" in k:  # <module>.lora_A.<adapter>.weight -> base_model.model.<module>.lora_A.weight
            module, ab, _adapter, leaf = k.rsplit(".", 3)
            adapters[f"{PEFT_PREFIX}{module}.{ab}.{leaf}"] = v.contiguous()
    config = peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=target_regex(lc),
                             inference_mode=True)
    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        config_bytes = open(os.path.join(d, ADAPTER_CONFIG), "rb").read()
    return {ADAPTER_CONFIG: config_bytes, ADAPTER_WEIGHTS: st_save(adapters, metadata={"format": "pt"})}


def load_with_adapter(model_dir: str, **kwargs):
    """An unmerged export with the adapter kept as peft modules (to train it further, or to unmerge):
    base weights (``adapter="skip"``), peft's LoRA layers injected, the saved adapter weights loaded.
    For inference :meth:`PhantomForCausalLM.from_pretrained` merges the adapter instead."""
    from safetensors.torch import load_file

    from phantom_ray.model import PhantomForCausalLM
    from phantom_ray.model.adapters import PEFT_PREFIX
    from phantom_ray.model.loading import resolve_checkpoint

    peft = _peft()
    local = str(resolve_checkpoint(model_dir))
    model = PhantomForCausalLM.from_pretrained(local, adapter="skip", **kwargs)
    peft.inject_adapter_in_model(peft.LoraConfig.from_pretrained(local), model)
    weights = load_file(os.path.join(local, ADAPTER_WEIGHTS))
    weights = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in weights.items()}
    result = peft.set_peft_model_state_dict(model, weights)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise ValueError(f"{model_dir}: adapter weights for unknown modules {sorted(unexpected)[:3]} ...")
    model.name_or_path = str(model_dir)
    return model.eval()
