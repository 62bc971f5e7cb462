"""The one loader (phantom_ray/loader.py): a preset, a local directory and an s3:// prefix give the
same model, tokenizer and processor; every download lands under the one cache root
($PHANTOM_RAY_CACHE); a missing model fails with one line naming it."""

from __future__ import annotations

import warnings

import pytest
import torch

from phantom_ray.loader import ModelNotFoundError, load_model, load_processor, local_model_dir
from phantom_ray.processing import load_tokenizer

torch.set_num_threads(1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("PHANTOM_RAY_CACHE", str(root))
    return root


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*a, **kw)


def _logits(loaded) -> torch.Tensor:
    s = loaded.processor.encode_prompt("What colour is the circle?")
    ids = s.input_ids[None]
    with torch.no_grad():
        return loaded.model(ids, torch.ones_like(ids)).logits


def test_preset_gives_model_tokenizer_processor_and_warns():
    with pytest.warns(UserWarning, match="randomly initialised"):
        loaded = load_model("tiny-qwen2", device="cpu", seed=3, max_length=300)
    assert loaded.local_dir is None and loaded.model_id == "tiny-qwen2"
    assert loaded.model.dtype == torch.float32 and not loaded.model.training
    assert loaded.processor.tokenizer is loaded.tokenizer and loaded.processor.max_length == 300
    again = _quiet(load_model, "tiny-qwen2", device="cpu", seed=3)
    assert torch.equal(_logits(loaded), _logits(again))  # the seed fixes the random weights


def test_local_model_dir_materialises_a_preset_once_and_loads_back_equal(cache):
    d = _quiet(local_model_dir, "tiny-qwen2", seed=3)
    assert d.parent.parent == cache and (d / "config.json").exists() and (d / "tokenizer.json").exists()
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert _quiet(local_model_dir, "tiny-qwen2", seed=3) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == stamp, "written twice"
    assert _quiet(local_model_dir, "tiny-qwen2", seed=4) != d  # keyed by preset and seed
    preset = _quiet(load_model, "tiny-qwen2", device="cpu", seed=3)
    from_dir = load_model(str(d), device="cpu")
    assert from_dir.local_dir == d
    assert torch.equal(_logits(preset), _logits(from_dir))
    assert from_dir.tokenizer.encode("a red circle") == preset.tokenizer.encode("a red circle")


def test_s3_checkpoint_downloads_once_into_the_one_cache_root(cache, s3_bucket):
    d = _quiet(local_model_dir, "tiny-internlm2", seed=0)
    from phantom_ray import storage

    uri = f"{s3_bucket}/models/tiny-internlm2"
    storage.upload_dir(str(d), uri)
    loaded = load_model(uri, device="cpu")
    assert loaded.local_dir is not None and cache in loaded.local_dir.parents
    assert torch.equal(_logits(loaded), _logits(load_model(str(d), device="cpu")))
    # the tokenizer alone and the weight-free processor read the same prefix, into the same root
    tok = load_tokenizer(uri)
    assert tok.encode("a red circle") == loaded.tokenizer.encode("a red circle")
    proc = load_processor(uri, 512)
    assert proc.encode_prompt("hi").input_ids.tolist() == loaded.processor.encode_prompt("hi").input_ids.tolist()
    downloads = {p.relative_to(cache).parts[0] for p in cache.rglob("*") if p.is_file()}
    assert downloads <= {"presets", "s3", "tokenizers"}, downloads


@pytest.mark.parametrize("model_id", ["s3://{bucket}/missing", "{tmp}/no-such-dir", "{tmp}/empty-dir"])
def test_missing_model_is_one_clear_line(model_id, s3_bucket, tmp_path, cache):
    (tmp_path / "empty-dir").mkdir()
    mid = model_id.format(bucket=s3_bucket[len("s3://"):], tmp=tmp_path)
    with pytest.raises(ModelNotFoundError) as err:
        load_model(mid, device="cpu")
    msg = str(err.value)
    assert mid in msg and "\n" not in msg
    assert not list(cache.glob("s3/*.tmp*")), "a failed download left a partial directory"
