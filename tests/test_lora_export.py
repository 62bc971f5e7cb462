"""Unmerged LoRA exports (``recipe.lora.merge_on_export: false``) load as trained, never as their base.

The export holds the base weights plus peft's standard ``adapter_config.json`` +
``adapter_model.safetensors``; every loader (torch ``from_pretrained``, hence the torch engine; the
vLLM model's ``load_weights``) merges the adapter, with the merged export's own arithmetic."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from train_helpers import pair_batches, tiny_cfg

pytest.importorskip("peft", reason="LoRA needs peft (the lora extra)")

torch.set_num_threads(1)


def _logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], image_repeat=2).logits


def test_unmerged_lora_export_loads_as_trained_and_equals_the_merged_export(tmp_path):
    import peft
    from safetensors.torch import load_file

    from phantom_ray.loader import load_weights
    from phantom_ray.model import PhantomForCausalLM
    from phantom_ray.train.lora import load_with_adapter
    from phantom_ray.train.recipe import PhantomRecipe

    batches = pair_batches(3, batch_size=4, seed=4)
    cfg = tiny_cfg(tmp_path, recipe={"step": 2, "lora": {"enabled": True, "r": 4, "vision": True,
                                                          "merge_on_export": False}}, optim={"lr": 5e-2})
    rec = PhantomRecipe(cfg).setup(2)
    rec.train_epoch(batches[:2])
    rec.engine.eval()
    batch = batches[2]
    want = _logits(rec.model, batch)
    unmerged = rec.export(str(tmp_path / "unmerged"))
    rec.cfg.recipe.lora.merge_on_export = True
    merged = rec.export(str(tmp_path / "merged"))

    # peft's standard layout next to the base weights
    files = set(os.listdir(unmerged))
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "config.json"} <= files
    assert "adapter_config.json" not in os.listdir(merged)
    acfg = json.load(open(os.path.join(unmerged, "adapter_config.json")))
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 4 and acfg["lora_alpha"] == cfg.recipe.lora.alpha
    keys = list(load_file(os.path.join(unmerged, "adapter_model.safetensors")))
    assert keys and all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in keys)
    assert any(".vision_model." in k for k in keys) and any(".language_model." in k for k in keys)

    # the one loader applies the adapter: the trained outputs, and exactly the merged export's weights
    loaded = PhantomForCausalLM.from_pretrained(unmerged)
    got = _logits(loaded, batch)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    ref = dict(PhantomForCausalLM.from_pretrained(merged).named_parameters())
    for n, p in loaded.named_parameters():
        assert torch.equal(p, ref[n]), n
    engine_model, _ = load_weights(unmerged, device="cpu", dtype="float32")  # what TorchEngine / serving load
    assert torch.equal(_logits(engine_model, batch), got)

    # base weights only on request, and they are not the trained model
    base = PhantomForCausalLM.from_pretrained(unmerged, adapter="skip")
    assert (_logits(base, batch) - want).abs().max() > 1e-3
    # peft's own loader reads the files (standard layout), and so does ours with the adapter kept as modules
    peft_model = peft.PeftModel.from_pretrained(base, unmerged).eval()
    assert torch.allclose(_logits(peft_model, batch), want, atol=1e-4)
    assert torch.allclose(_logits(load_with_adapter(unmerged), batch), want, atol=1e-4)


def write_lora_export(directory: str, seed: int = 0, scale: float = 0.5) -> str:
    """An unmerged LoRA export of the tiny preset whose adapter changes the model a lot (no training:
    random adapter weights), written by the training export's own functions; returns the directory."""
    from phantom_ray.model import PhantomForCausalLM
    from phantom_ray.processing import load_tokenizer
    from phantom_ray.train.config import LoraSection
    from phantom_ray.train.lora import adapter_files, base_state_dict, wrap_lora

    model = PhantomForCausalLM.from_preset("tiny-qwen2", seed=seed)
    lc = LoraSection(enabled=True, r=4, alpha=8, vision=True, merge_on_export=False)
    wrap_lora(model, lc)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    sd = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    out = PhantomForCausalLM(model.config)
    out.load_state_dict(base_state_dict(sd), strict=False)
    out.save_pretrained(directory, extra_files=adapter_files(sd, lc))
    load_tokenizer("tiny-qwen2", model.config).save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_vllm_engine_applies_the_unmerged_adapter(tmp_path):
    """vLLM's load_weights merges the adapter too: the same greedy text as the torch engine on the
    export, which differs from the base weights' text."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from phantom_ray.infer.api import Request, SamplingParams
    from phantom_ray.infer.torch_engine import TorchEngine
    from phantom_ray.vllm.engine import VLLMEngine

    export = write_lora_export(str(tmp_path / "unmerged"))
    base_dir = str(tmp_path / "base")
    shutil.copytree(export, base_dir, ignore=shutil.ignore_patterns("adapter_*"))
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    reqs = [Request.user(q, params=greedy, key=str(i)) for i, q in enumerate(
        ["What colour is the circle?", "Describe the image.", "Count the shapes."])]

    def texts(engine):
        out = engine.generate(reqs)
        assert all(o.error is None for o in out), [o.error_detail for o in out]
        return [o.text for o in out]

    torch_trained = texts(TorchEngine.load(export, seed=0, device="cpu", dtype="float32"))
    torch_base = texts(TorchEngine.load(base_dir, seed=0, device="cpu", dtype="float32"))
    assert torch_trained != torch_base  # the adapter changes the answers
    v = VLLMEngine.load(export, seed=0, dtype="float32", max_model_len=256, kv_cache_memory_bytes=32 * 2**20,
                        max_num_seqs=4)
    try:
        assert texts(v) == torch_trained
    finally:
        v.close()
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
