"""The shipped chain runs: model init -> pack -> step 1 -> step 2 -> eval -> caption -> serve.

Every step is submitted as a Ray job to a local Ray head (what a KubeRay RayJob and `ray job submit`
do) with the entrypoint and runtime env of its shipped manifest (cluster/kuberay/rayjob-*.yaml, the
step-2 train job by the substitution its comment gives, serve/gpu-cluster.yaml for serving), against
S3 on loopback (moto) at the shipped bucket and paths: each step reads what the previous one wrote.

Only these overrides are applied, as flags and dotted overrides the entry points already accept:
- size: the tiny-internlm2 preset and a tiny InternVL2-layout source for phantom-7b / InternVL2-8B
  (tests/upstream_checkpoints.py), few samples, 1 optimizer step, short answers, 2 eval items of the
  two benchmarks whose synthetic files tests/eval_synthetic.py writes (a subset of the config's list),
  one of the four served sizes (the one this chain trained);
- resources: CPU instead of GPU (num_gpus 0, use_gpu false, fractional CPUs, one replica, a small
  vLLM KV cache instead of a GPU memory fraction, float32 for the served model where an H100 runs
  bfloat16), a free loopback port for Serve;
- bucket endpoint: AWS_ENDPOINT_URL and keys of the moto server.
Anything else a step needs is a defect of the shipped files.
"""

from __future__ import annotations

import copy
import io
import json
import shlex
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

import cluster_files as cf
from helpers import free_port, submit_job, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# An InternLM2 export (phantom-7b / 1.8b) carries a tokenizer.json converted from InternVL2's
# SentencePiece model (processing.tokenizers.tokenizer_files), so vLLM's AutoTokenizer loads it without
# the remote-code InternLM2Tokenizer (tests/test_tokenizer_export.py).

SIZE = "phantom-7b"
TINY = "tiny-internlm2"      # InternVL2-8B's LLM family (InternLM2.5) at the tiny size
EVAL_BENCHMARKS = ["sqa", "pope"]  # synthetic files exist for these two (tests/eval_synthetic.py)

TRAIN_OVERRIDES = [
    f"model.preset={TINY}",
    "data.batch_size=2", "data.shuffle_buffer_size=8", "data.max_tokens_per_row=1024", "data.max_length=512",
    "data.num_preprocess_tasks=1", "data.preprocess_num_cpus=0.25", "data.preprocess_batch_size=4",
    "data.prefetch_batches=1",
    "scaling.num_workers=2", "scaling.use_gpu=false", "scaling.resources_per_worker={CPU: 0.25}",
    "run.max_steps=1", "run.report_every=1", "run.checkpoint_every=1",
]


def _runtime_env(manifest_name: str | None, extra_env: dict) -> dict:
    """The manifest's runtimeEnvYAML, with the image's repository copy (its working_dir) = this checkout."""
    env = yaml.safe_load(cf.manifest(manifest_name)["spec"]["runtimeEnvYAML"]) if manifest_name else {}
    env["working_dir"] = str(cf.REPO)
    env["excludes"] = [".git", ".venv", "runs", "tests", "bench", "**/__pycache__", ".phantom_ray_quickstart"]
    env["env_vars"] = {**env.get("env_vars", {}), **extra_env}
    return env


def _start_job(client, entrypoint: list[str], runtime_env: dict) -> tuple[str, list[str], float]:
    return submit_job(client, entrypoint=shlex.join(entrypoint), runtime_env=runtime_env), entrypoint, time.time()


def _finish_job(client, started: tuple[str, list[str], float], timeout: float, log: list) -> str:
    """Wait for a started job (helpers.wait_job), record its time, fail with its log tail."""
    job_id, entrypoint, t0 = started
    status = wait_job(client, job_id, max(1.0, timeout - (time.time() - t0)))
    logs = client.get_job_logs(job_id)
    log.append((entrypoint[1], round(time.time() - t0, 1)))
    assert status == "SUCCEEDED", f"{shlex.join(entrypoint)}: {status}\n{logs[-4000:]}"
    return logs


def _run_job(client, entrypoint: list[str], runtime_env: dict, timeout: float, log: list) -> str:
    return _finish_job(client, _start_job(client, entrypoint, runtime_env), timeout, log)


def _empty_bucket(bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def _exists(uri: str, name: str) -> bool:
    from phantom_ray import storage

    return storage.exists(storage.join(uri, name))


def test_the_shipped_chain_runs_end_to_end(s3_server, ray_head, tmp_path, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    from phantom_ray import storage
    from phantom_ray.data.synth import synthesize
    from eval_synthetic import write_synthetic_benchmark
    from upstream_checkpoints import write_internvl2

    address, head_env = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", head_env["RAY_AUTH_MODE"])
    client = JobSubmissionClient(address)
    endpoint = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION")}
    extra_env = {**endpoint, "PHANTOM_RAY_CACHE": str(tmp_path / "cache"), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    timings: list = []

    # ---- an empty bucket with the user's inputs (docs/cluster.md: corpora/, images/, benchmarks/)
    init_argv = cf.rayjob_argv("rayjob-init.yaml")
    bucket = cf.option_value(init_argv, "--output").split("/")[2]
    _empty_bucket(bucket)
    pack_argv = cf.rayjob_argv("rayjob-pack.yaml")
    synthesize(cf.option_value(pack_argv, "--input"), num_samples=12, layout="triples", image_size=32,
               heldout_fraction=0.0)
    cap_argv = cf.rayjob_argv("rayjob-caption.yaml")
    from PIL import Image

    for i, rgb in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), rgb).save(buf, format="PNG")
        storage.write_bytes_atomic(storage.join(cf.option_value(cap_argv, "--input"), f"img-{i}.png"), buf.getvalue())
    eval_cfg_path = cf.option_value(cf.rayjob_argv("rayjob-eval.yaml"), "--config")
    eval_cfg = cf.load_yaml(cf.REPO / eval_cfg_path)
    assert set(EVAL_BENCHMARKS) <= set(eval_cfg["benchmarks"])
    for name in EVAL_BENCHMARKS:
        write_synthetic_benchmark(eval_cfg["data_root"], name, 2)

    # ---- init: the tiny InternVL2-layout checkpoint stands for OpenGVLab/InternVL2-8B (size override)
    assert cf.option_value(init_argv, "--size") == SIZE
    source = write_internvl2(tmp_path / "InternVL2-8B-tiny", "internlm2")
    init_out = cf.option_value(init_argv, "--output")
    # init and pack are independent (docs/cluster.md runs them side by side)
    init_job = _start_job(client, init_argv + ["--size", TINY, "--source", str(source)],
                          _runtime_env("rayjob-init.yaml", extra_env))
    pack_job = _start_job(client, pack_argv, _runtime_env("rayjob-pack.yaml", extra_env))
    _finish_job(client, init_job, 300, timings)
    assert _exists(init_out, "config.json")
    _finish_job(client, pack_job, 300, timings)
    pack_out = cf.option_value(pack_argv, "--output")
    assert _exists(pack_out, "manifest.json"), "pack wrote no manifest"

    # ---- training step 1, then step 2 (the RayJob's substitution step1 -> step2)
    train_argv = cf.rayjob_argv("rayjob-train.yaml")
    train_env = _runtime_env("rayjob-train.yaml", extra_env)
    exports = []
    for argv in (train_argv, [a.replace("step1", "step2") for a in train_argv]):
        from phantom_ray.train.config import TrainConfig

        cfg = TrainConfig.from_yaml(cf.REPO / cf.option_value(argv, "--config"))
        assert [s.rstrip("/") for s in cfg.data.shards] == [pack_out.rstrip("/")]
        assert cfg.model.init_from == (init_out if cfg.recipe.step == 1 else exports[-1])
        logs = _run_job(client, argv + TRAIN_OVERRIDES, train_env, 420, timings)
        export = cfg.run.export_uri()
        assert _exists(export, "config.json"), logs[-3000:]
        assert export in logs
        exports.append(export)
    model_uri = exports[-1]

    # ---- eval and caption of step 2's export: independent, so side by side (as init and pack)
    eval_argv = cf.rayjob_argv("rayjob-eval.yaml")
    assert eval_cfg["model"] == model_uri
    assert cf.option_value(cap_argv, "--model") == model_uri
    eval_job = _start_job(client, eval_argv + [f"benchmarks=[{','.join(EVAL_BENCHMARKS)}]", "limit=2", "num_gpus=0",
                                               "num_cpus=0.5", "min_replicas=1", "max_replicas=1"],
                          _runtime_env("rayjob-eval.yaml", extra_env))
    cap_job = _start_job(client, cap_argv + ["--num-gpus", "0", "--num-cpus", "0.5", "--min-replicas", "1",
                                             "--max-replicas", "1", "--max-tokens", "4", "--batch-size", "4",
                                             "--no-progress"],
                         _runtime_env("rayjob-caption.yaml", extra_env))
    _finish_job(client, eval_job, 400, timings)
    results = json.loads(storage.read_bytes(storage.join(eval_cfg["output"], "results.json")))
    assert results, "eval wrote no results"
    _finish_job(client, cap_job, 400, timings)
    import pyarrow.parquet as pq

    out = cf.option_value(cap_argv, "--output")
    parts = [u for u in storage.iter_files(out, suffixes=(".parquet",)) if "/part-" in u]
    rows = [r for u in parts for r in pq.read_table(io.BytesIO(storage.read_bytes(u))).to_pylist()]
    assert len(rows) == 3 and all(r["error"] is None and r["caption"] is not None for r in rows), rows

    # ---- serve step 2's export (serve/gpu-cluster.yaml, the RayService's application), one request
    config = copy.deepcopy(cf.load_yaml(cf.SERVE_DIR / "gpu-cluster.yaml"))
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    (model,) = [m for m in app["args"]["models"] if m["name"] == SIZE]
    assert model["checkpoint"] == model_uri
    # resources: no GPU; a small KV cache instead of a GPU memory fraction; float32, as bfloat16 is the
    # H100's precision and this CPU has no bf16 instructions for vLLM's CPU kernels
    model.update(num_gpus=0, num_cpus=0.5, kv_cache_memory_bytes=32 * 2**20, dtype="float32")
    model.pop("gpu_memory_utilization", None)
    model["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    app["args"]["models"] = [model]
    app["args"]["ingress_num_cpus"] = 0.1
    app["runtime_env"] = {**app.get("runtime_env", {}), "env_vars": {**app["runtime_env"]["env_vars"], **extra_env}}
    serve_file = tmp_path / "serve.yaml"
    serve_file.write_text(yaml.safe_dump(config))
    t0 = time.time()
    bin_dir = os.path.dirname(sys.executable)
    subprocess.run([os.path.join(bin_dir, "serve"), "deploy", "--address", address, str(serve_file)],
                   check=True, env={**head_env, **os.environ}, capture_output=True, timeout=120)
    body = json.dumps({"model": SIZE, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}).encode()
    deadline, answer, last = time.time() + 240, None, None
    while time.time() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                answer = json.loads(resp.read())
                break
        except Exception as exc:  # not deployed yet: connection refused / 404 / 503
            last = exc
            time.sleep(2)
    timings.append(("serve", round(time.time() - t0, 1)))
    print("chain timings (s):", timings)
    assert answer is not None, f"no answer from the served {SIZE}: {last}"
    assert answer["model"] == SIZE and answer["choices"][0]["message"]["role"] == "assistant"
