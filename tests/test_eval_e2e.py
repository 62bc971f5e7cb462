"""End to end: ``jobs/eval.py`` over two tiny synthetic benchmarks (POPE, ScienceQA) on the
tiny-qwen2 preset, generating through the Ray Data actor pool (phantom_ray.eval.predict over phantom_ray.infer); the predictions
it writes equal those of the in-process engine, for greedy decoding and for beam search."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from eval_synthetic import write_synthetic_benchmark
from phantom_ray.eval import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def _job_module():
    spec = importlib.util.spec_from_file_location("_job_eval", REPO / "jobs" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    write_synthetic_benchmark(str(root), "pope", 3)  # 3 items per split, 3 splits
    write_synthetic_benchmark(str(root), "sqa", 4)
    return str(root)


def test_eval_job_end_to_end_through_the_actor_pool(ray_local, data_root, tmp_path, capsys):
    from phantom_ray.eval.predict import make_predict_fn

    out = tmp_path / "eval_out"
    job = _job_module()
    rc = job.main(["--model", "tiny-qwen2", "--benchmarks", "pope,sqa", "--data-root", data_root,
                   "--output", str(out), "--batch-size", "4"])
    assert rc == 0
    assert "| pope |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["benchmark"] for r in results["results"]] == ["pope", "sqa"]
    assert results["settings"] == {"num_beams": 1, "batch_size": 4}
    local = make_predict_fn("tiny-qwen2", num_beams=1, batch_size=3, use_ray=False)
    for row in results["results"]:
        name = row["benchmark"]
        items = load_benchmark(name, data_root)
        assert row["n"] == len(items) > 0 and 0.0 <= row["score"] <= 100.0
        preds = [json.loads(line) for line in (out / "predictions" / f"{name}.jsonl").read_text().splitlines()]
        assert [p["id"] for p in preds] == [it.id for it in items]
        # the Ray path (decode tasks + actor pool, batches of 4) == the in-process engine (batches of 3)
        assert [p["prediction"] for p in preds] == local(items)


def test_beam_search_predictions_through_ray_equal_in_process(ray_local, data_root):
    from phantom_ray.eval.predict import make_predict_fn

    items = load_benchmark("sqa", data_root)
    ray_fn = make_predict_fn("tiny-qwen2", num_beams=3, batch_size=2, num_cpus=0.5, decode_num_cpus=0.5)
    local = make_predict_fn("tiny-qwen2", num_beams=3, batch_size=4, use_ray=False)
    beams = ray_fn(items)
    assert beams == local(items)
    assert len(beams) == len(items) and all(isinstance(p, str) for p in beams)
