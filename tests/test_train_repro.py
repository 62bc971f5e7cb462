"""Reproducible training: two runs of the same config on the same cluster shape (2 Ray Train workers,
DeepSpeed ZeRO-2, 2 preprocessing actors, shuffling on) give the same loss at every step.

What makes it so is described in :mod:`phantom_ray.data.pipeline` (``data.deterministic``: Ray
Data's ``preserve_order``, seeded file order, mixture and local shuffle) and the recipe (model init
and dropout seeded by ``run.seed``)."""

from __future__ import annotations

import os

import pytest

from phantom_ray.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_runs_of_one_config_give_identical_per_step_losses(ray_local, tmp_path):
    from phantom_ray.train.ray_trainer import run_training
    from phantom_ray.train.tracking import read_metrics

    shards = str(tmp_path / "packed")

    def run(name: str) -> list[dict]:
        cfg = TrainConfig.from_yaml(os.path.join(REPO, "configs/train/tiny-cpu.yaml"), overrides=[
            f"data.shards={shards}", "data.val_shards=null", f"run.storage_path={tmp_path / 'runs'}",
            f"run.name={name}", "synth.num_samples=160", "data.batch_size=4", "run.max_steps=4",
            "run.report_every=1", "run.val_every=null", "run.checkpoint_every=100", "scaling.cpus_per_worker=0.25",
            "data.num_preprocess_tasks=2", "data.preprocess_num_cpus=0.25", "data.preprocess_batch_size=4",
            "data.shuffle_buffer_size=16"])
        assert cfg.data.deterministic and cfg.data.shuffle
        run_training(cfg)
        return [m for m in read_metrics(str(tmp_path / "runs" / name)) if m["split"] == "train"]

    first, second = run("a"), run("b")
    assert [m["step"] for m in first] == list(range(1, 5))
    keys = ("loss", "sft_loss", "pref_loss", "reward_margin", "pref_accuracy", "grad_norm", "row_fill", "lr")
    got = [[m[k] for k in keys] for m in second]
    want = [[m[k] for k in keys] for m in first]
    assert got == want, "per-step metrics differ between two runs of the same config"
