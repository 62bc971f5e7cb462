"""EvalConfig: the eval stage in the one config style (YAML, flags, dotted overrides), and the CLI on it."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from eval_synthetic import write_synthetic_benchmark

from phantom_ray.config import ConfigError
from phantom_ray.eval.config import EvalConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "eval").glob("*.yaml")), ids=lambda p: p.name)
def test_repo_eval_configs_load(path):
    cfg = EvalConfig.from_yaml(path)
    assert cfg.benchmarks and cfg.model


def test_benchmarks_paths_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = EvalConfig.from_dict({"model": "tiny-qwen2", "benchmarks": "sqa,mm-vet,sqa", "data_root": "data",
                                "output": "s3://b/out"})
    assert cfg.benchmarks == ["sqa", "mmvet"]  # aliases mapped, duplicates dropped
    assert cfg.data_root == str(tmp_path / "data") and cfg.output == "s3://b/out"
    assert cfg.predict_options() == {} and cfg.settings() == {"num_beams": 1, "batch_size": 8}
    (tmp_path / "e.yaml").write_text("model: m\nbenchmarks: [pope]\ndata_root: d\noutput: o\nbeams: 3\n")
    with pytest.raises(ConfigError, match=r"e\.yaml: beams: unknown field"):
        EvalConfig.from_yaml(tmp_path / "e.yaml")
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        EvalConfig.from_dict({"model": "m", "benchmarks": ["nope"], "data_root": "d", "output": "o"})
    with pytest.raises(ConfigError, match="below min_replicas"):
        EvalConfig.from_dict({"model": "m", "benchmarks": ["pope"], "data_root": "d", "output": "o",
                              "min_replicas": 4, "max_replicas": 2})


@pytest.fixture()
def plugged(monkeypatch, tmp_path):
    """A stand-in generation path that answers correctly and records what it was asked for."""
    root = str(tmp_path / "data")
    answers = {}
    for name in ("sqa", "pope"):
        answers.update(write_synthetic_benchmark(root, name, 3))
    got = {}

    def make_predict_fn(model, num_beams=1, batch_size=8, **options):
        got.update(model=model, num_beams=num_beams, batch_size=batch_size, **options)
        return lambda items: [answers[i.id] for i in items]

    monkeypatch.setitem(sys.modules, "phantom_ray.eval.predict", types.SimpleNamespace(make_predict_fn=make_predict_fn))
    monkeypatch.delenv("PHANTOM_JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("PHANTOM_JUDGE_API_KEY", raising=False)
    return root, got


def test_cli_yaml_then_flags_then_overrides(plugged, tmp_path, capsys):
    from phantom_ray.cli import main

    root, got = plugged
    out = tmp_path / "out"
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(f"model: from-yaml\nbenchmarks: [sqa]\ndata_root: {root}\noutput: {out}\n"
                        "num_beams: 2\nmax_replicas: 2\ndtype: float32\n")
    rc = main(["eval", "--config", str(cfg_path), "--model", "tiny-qwen2", "--benchmarks", "sqa,pope",
               "num_beams=3", "max_length=512"])
    assert rc == 0, capsys.readouterr().err
    assert got == {"model": "tiny-qwen2", "num_beams": 3, "batch_size": 8, "max_replicas": 2,
                   "dtype": "float32", "max_length": 512}
    results = json.loads((out / "results.json").read_text())
    assert [r["benchmark"] for r in results["results"]] == ["sqa", "pope"]
    assert results["settings"] == {"num_beams": 3, "batch_size": 8, "dtype": "float32", "max_length": 512}
    saved = EvalConfig.from_yaml(out / "eval_config.yaml")  # the run's config, next to its results
    assert saved.model == "tiny-qwen2" and saved.num_beams == 3


def test_cli_dry_run_and_errors(plugged, tmp_path, capsys):
    from phantom_ray.cli import main

    root, got = plugged
    assert main(["eval", "--model", "m", "--benchmarks", "pope", "--data-root", root, "--output", "o",
                 "--dry-run"]) == 0
    assert "benchmarks:\n- pope\n" in capsys.readouterr().out and got == {}
    assert main(["eval", "--benchmarks", "pope", "--data-root", root, "--output", "o"]) == 2
    assert "command line: model: Field required" in capsys.readouterr().err
    # a judge-scored benchmark with judge.required and no judge in the environment
    assert main(["eval", "--model", "m", "--benchmarks", "mmvet", "--data-root", root, "--output", "o",
                 "judge.required=true"]) == 2
    assert "PHANTOM_JUDGE_BASE_URL" in capsys.readouterr().err
