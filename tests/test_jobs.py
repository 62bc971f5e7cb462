"""Operations: real `ray job submit` of the training and captioning jobs to a local Ray head, with
local storage (make test-extended; make test's tests/test_chain_run.py submits the same entry points
with the shipped manifests' arguments, on S3)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import submit_job, wait_job

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.extended  # test_chain_run.py submits the same jobs (from the shipped manifests, on S3)
def test_submit_training_and_captioning_jobs(ray_head, tmp_path, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    address, env = ray_head
    for k in ("RAY_AUTH_MODE",):
        monkeypatch.setenv(k, env[k])
    client = JobSubmissionClient(address)
    runtime_env = {"working_dir": str(REPO), "excludes": [".git", ".venv", "runs", "tests", "bench", "**/__pycache__"],
                   "env_vars": {"TOKENIZERS_PARALLELISM": "false", "PHANTOM_RAY_CACHE": str(tmp_path / "cache")}}
    runs = tmp_path / "runs"
    train_id = submit_job(
        client,
        entrypoint=(f"python jobs/train.py --config configs/train/tiny-cpu.yaml run.storage_path={runs} "
                    f"data.shards=[{tmp_path / 'packed'}] synth.num_samples=96 run.epochs=1 run.max_steps=3 "
                    "scaling.cpus_per_worker=0.25 data.preprocess_num_cpus=0.25"),
        runtime_env=runtime_env)
    status = wait_job(client, train_id, 900)
    logs = client.get_job_logs(train_id)
    assert status == "SUCCEEDED", logs[-3000:]
    export = runs / "tiny-cpu" / "export"
    assert (export / "config.json").exists() and str(export) in logs

    images = tmp_path / "images"
    shutil.copytree(tmp_path / "packed" / "_synth" / "heldout" / "images", images)
    n_images = len(list(images.iterdir()))
    cap_id = submit_job(
        client,
        entrypoint=(f"python jobs/caption.py --input {images} --output {tmp_path / 'captions'} --model {export} "
                    "--max-tokens 4 --batch-size 8 --num-gpus 0 --no-progress"),
        runtime_env=runtime_env)
    status = wait_job(client, cap_id, 600)
    assert status == "SUCCEEDED", client.get_job_logs(cap_id)[-3000:]
    from phantom_ray.caption import read_outputs

    rows = read_outputs(str(tmp_path / "captions"))
    assert sorted(os.path.basename(r["image_uri"]) for r in rows) == sorted(p.name for p in images.iterdir())
    assert len(rows) == n_images and all(r["error"] is None and r["caption"] is not None for r in rows)
