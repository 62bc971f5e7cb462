"""LoRA for step 2 (``recipe.lora``): peft adapters on the LLM linears (and optionally the vision
tower's), phantom modules and ``vision_proj`` fully trainable next to them; export either merged
into full weights (``merge_on_export: true``) or as base weights plus, in the same directory,
peft's ``adapter_config.json`` + ``adapter_model.safetensors`` (reloaded by :func:`load_with_adapter`).

peft is the ``lora`` extra (``pip install 'phantom-ray[lora]'``); it is imported only when LoRA is on.
"""

from __future__ import annotations

import json

import torch

VISION_TARGETS = ["qkv", "proj", "fc1", "fc2"]  # InternViT attention and MLP linears
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


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
    """Full weights with every adapter merged: W + scaling * B @ A; adapter keys dropped."""
    out = base_state_dict(sd)
    for k in sd:
        if ".lora_A." in k:
            base, rest = k.split(".lora_A.")
            adapter = rest.split(".")[0]
            delta = sd[f"{base}.lora_B.{adapter}.weight"] @ sd[k]
            out[f"{base}.weight"] = out[f"{base}.weight"] + model.get_submodule(base).scaling[adapter] * delta
    return out


def base_state_dict(sd: dict) -> dict:
    """The base model's weights (peft's ``base_layer`` renamed back), adapters left out."""
    return {k.replace(".base_layer.", "."): v for k, v in sd.items() if "lora_" not in k}


def adapter_files(sd: dict, lc) -> dict[str, bytes]:
    """``adapter_config.json`` + ``adapter_model.safetensors`` for an unmerged export."""
    from safetensors.torch import save as st_save

    adapters = {k: v.contiguous() for k, v in sd.items() if "lora_" in k}
    config = {"peft_type": "LORA", "r": lc.r, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout,
              "target_modules": list(lc.target_modules), "vision": lc.vision,
              "vision_target_modules": VISION_TARGETS if lc.vision else []}
    return {ADAPTER_CONFIG: json.dumps(config, indent=2).encode(), ADAPTER_WEIGHTS: st_save(adapters)}


def load_with_adapter(model_dir: str, **kwargs):
    """A model exported with ``merge_on_export: false``: base weights, then the adapter on top."""
    from safetensors.torch import load as st_load

    from phantom_ray import storage
    from phantom_ray.model import PhantomForCausalLM

    peft = _peft()
    model = PhantomForCausalLM.from_pretrained(model_dir, **kwargs)
    config = json.loads(storage.read_text(storage.join(model_dir, ADAPTER_CONFIG)))
    lc = dict(r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"])
    peft.inject_adapter_in_model(peft.LoraConfig(target_modules=config["target_modules"], **lc), model.language_model)
    if config.get("vision"):
        peft.inject_adapter_in_model(peft.LoraConfig(target_modules=config["vision_target_modules"], **lc),
                                     model.vision_model)
    weights = st_load(storage.read_bytes(storage.join(model_dir, ADAPTER_WEIGHTS)))
    missing = set(weights) - set(dict(model.named_parameters()))
    if missing:
        raise ValueError(f"{model_dir}: adapter weights for unknown modules {sorted(missing)[:3]} ...")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in weights.items():
            params[k].copy_(v.to(params[k].dtype))
    return model.eval()
