"""Operations: real `ray job submit` of the training and captioning jobs to a local Ray head, and the
quickstart end to end with the small budget."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A separate local Ray head on loopback (not the test process's own runtime), stopped afterwards.

    ``ray start --block`` keeps the head's processes children of one Popen, so terminating it stops
    exactly this head (``ray stop`` would stop every Ray instance on the machine)."""
    import tempfile

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    port, dash, agent = _free_port(), _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    proc = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--dashboard-agent-listen-port={agent}",
                             "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            try:
                JobSubmissionClient(f"http://127.0.0.1:{dash}").list_jobs()
                break
            except Exception:  # not up yet: connection refused / dashboard starting
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the local Ray head did not come up")
                time.sleep(1)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        shutil.rmtree(temp, ignore_errors=True)


def _submit(client, **kwargs) -> str:
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as exc:  # the head's job agent starts a little after the dashboard
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def _wait(client, job_id: str, timeout: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(2)
    client.stop_job(job_id)
    return "TIMEOUT"


@pytest.mark.slow
def test_submit_training_and_captioning_jobs(ray_head, tmp_path, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    address, env = ray_head
    for k in ("RAY_AUTH_MODE",):
        monkeypatch.setenv(k, env[k])
    client = JobSubmissionClient(address)
    runtime_env = {"working_dir": str(REPO), "excludes": [".git", ".venv", "runs", "tests", "bench", "**/__pycache__"],
                   "env_vars": {"TOKENIZERS_PARALLELISM": "false", "PHANTOM_RAY_CACHE": str(tmp_path / "cache")}}
    runs = tmp_path / "runs"
    train_id = _submit(
        client,
        entrypoint=(f"python jobs/train.py --config configs/train/tiny-cpu.yaml run.storage_path={runs} "
                    f"data.shards=[{tmp_path / 'packed'}] synth.num_samples=96 run.epochs=1 run.max_steps=3 "
                    "scaling.cpus_per_worker=0.25 data.preprocess_num_cpus=0.25"),
        runtime_env=runtime_env)
    status = _wait(client, train_id, 900)
    logs = client.get_job_logs(train_id)
    assert status == "SUCCEEDED", logs[-3000:]
    export = runs / "tiny-cpu" / "export"
    assert (export / "config.json").exists() and str(export) in logs

    images = tmp_path / "images"
    shutil.copytree(tmp_path / "packed" / "_synth" / "heldout" / "images", images)
    n_images = len(list(images.iterdir()))
    cap_id = _submit(
        client,
        entrypoint=(f"python jobs/caption.py --input {images} --output {tmp_path / 'captions'} --model {export} "
                    "--max-new-tokens 4 --batch-size 8 --num-gpus 0 --no-progress"),
        runtime_env=runtime_env)
    status = _wait(client, cap_id, 600)
    assert status == "SUCCEEDED", client.get_job_logs(cap_id)[-3000:]
    from phantom_ray.caption import read_outputs

    rows = read_outputs(str(tmp_path / "captions"))
    assert sorted(os.path.basename(r["image_uri"]) for r in rows) == sorted(p.name for p in images.iterdir())
    assert len(rows) == n_images and all(r["error"] is None and r["caption"] is not None for r in rows)
