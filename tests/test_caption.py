"""Batch captioning pipeline (phantom_ray.infer.caption) on local Ray and moto S3, tiny preset.

- a bucket of ~200 synthetic images with corrupt ones: every image appears in exactly one output
  row, corrupt ones as error rows with their reason; a re-run does nothing;
- captions from the pipeline equal a direct ``model.generate`` on each image alone;
- the driver (the CLI in a subprocess) is SIGKILLed after its first shards land, the command is
  re-run, and the outputs equal those of an uninterrupted run: no duplicate, no missing image;
- manifests, JSONL output, settings mismatch, and the shard plan's stability, without Ray.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phantom_ray import storage
from phantom_ray.infer.caption import (CaptionConfig, caption, list_inputs, output_shards, plan_groups,
                                       read_outputs)
from phantom_ray.infer.api import SamplingParams

REPO = Path(__file__).resolve().parents[1]
N_GOOD = 200
MAX_NEW = 4
MAX_PIXELS = 100 * 100
BAD = {"zero.jpg": "empty_image", "garbage.png": "undecodable_image", "truncated.png": "undecodable_image",
       "huge.png": "too_many_pixels"}


def _image(i: int, fmt: str = "PNG", size: tuple[int, int] | None = None) -> bytes:
    w, h = size or (16 + (i * 7) % 40, 16 + (i * 11) % 30)
    arr = np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def _write_images(root: str, n_good: int) -> list[str]:
    """Good images under root/images (nested, mixed formats) plus corrupt ones; returns their URIs."""
    uris = []
    for i in range(n_good):
        sub = f"batch{i % 3}/" if i % 2 else ""
        ext, fmt = ((".JPG", "JPEG") if i % 10 == 3 else (".jpeg", "JPEG") if i % 10 == 7 else (".png", "PNG"))
        uri = storage.join(root, "images", f"{sub}img{i:04d}{ext}")
        storage.write_bytes_atomic(uri, _image(i, fmt))
        uris.append(uri)
    bad = {"zero.jpg": b"", "garbage.png": b"\x89PNG but not really" * 5, "truncated.png": _image(999)[:60],
           "huge.png": _image(1000, size=(120, 120))}
    for name, data in bad.items():
        uri = storage.join(root, "images", "bad", name)
        storage.write_bytes_atomic(uri, data)
        uris.append(uri)
    storage.write_text_atomic(storage.join(root, "images", "README.txt"), "not an image")  # filtered out
    storage.write_bytes_atomic(storage.join(root, "images", "_staging.png"), _image(5))  # hidden: skipped
    return sorted(uris)


def _config(input: str, output: str, **kw) -> CaptionConfig:
    base = dict(input=input, output=output, model="tiny-qwen2", generation=SamplingParams(max_tokens=MAX_NEW),
                batch_size=8, min_replicas=1, max_replicas=1, num_gpus=0, num_cpus=0.5, decode_num_cpus=0.5,
                decode_concurrency=1, shard_size=32, max_pixels=MAX_PIXELS, progress=False)
    base.update(kw)
    return CaptionConfig(**base)


def _rows_by_uri(output: str) -> dict[str, dict]:
    rows = read_outputs(output)
    by_uri = {r["image_uri"]: r for r in rows}
    assert len(by_uri) == len(rows), "an image appears in more than one output row"
    return by_uri


@pytest.fixture(scope="module")
def bucket(s3_server, ray_local):
    import boto3
    import uuid

    name = f"caption-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    root = f"s3://{name}"
    uris = _write_images(root, N_GOOD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t0 = time.perf_counter()
        summary = caption(_config(f"{root}/images/", f"{root}/captions/run1"))
        print(f"\nfirst pipeline run: {time.perf_counter() - t0:.1f}s")
    return {"root": root, "uris": uris, "summary": summary, "output": f"{root}/captions/run1"}


def test_every_image_appears_exactly_once_with_corrupt_ones_as_error_rows(bucket):
    rows = _rows_by_uri(bucket["output"])
    assert sorted(rows) == bucket["uris"]
    for uri, r in rows.items():
        name = uri.rsplit("/", 1)[-1]
        if name in BAD:
            assert r["error"] == BAD[name], (uri, r)
            assert r["caption"] is None and r["error_detail"] and r["tokens_generated"] == 0
        else:
            assert r["error"] is None, (uri, r)
            assert isinstance(r["caption"], str) and 1 <= r["tokens_generated"] <= MAX_NEW
            assert r["num_tiles"] >= 1 and r["finish_reason"] in ("stop", "length")
        assert r["model"] == "tiny-qwen2" and r["prompt"] == "Describe the image in detail."
        assert json.loads(r["generation"])["max_tokens"] == MAX_NEW
    shards = output_shards(bucket["output"])
    assert len(shards) == math.ceil(len(bucket["uris"]) / 32)
    assert all(storage.basename(s).startswith("part-") and s.endswith(".parquet") for s in shards)
    s = json.loads(storage.read_text(f"{bucket['output']}/_summary.json"))
    assert s["images"] == s["images_processed"] == len(bucket["uris"]) and s["images_already_done"] == 0
    assert s["errors_by_reason"] == {"empty_image": 1, "too_many_pixels": 1, "undecodable_image": 2}
    assert s["captioned"] == N_GOOD and s["tokens_generated"] == sum(r["tokens_generated"] for r in rows.values())
    assert s["tokens_per_s"] > 0 and s["wall_s"] > 0 and s == bucket["summary"]


def test_pipeline_captions_equal_direct_generate_per_image(bucket):
    from engine_helpers import greedy_reference

    from phantom_ray.infer import load_engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        engine = load_engine("tiny-qwen2", backend="torch", seed=0)
    rows = _rows_by_uri(bucket["output"])
    checked = 0
    for uri, r in rows.items():
        if r["error"] is None:
            want = greedy_reference(engine, storage.read_bytes(uri), "Describe the image in detail.", MAX_NEW)
            assert r["caption"] == want, uri
            checked += 1
    assert checked == N_GOOD


def test_rerun_of_a_finished_output_does_nothing(bucket):
    before = {u: storage.read_bytes(u) for u in output_shards(bucket["output"])}
    summary = caption(_config(f"{bucket['root']}/images/", bucket["output"]))
    assert summary["images_processed"] == 0 and summary["shards_written"] == 0
    assert summary["images_already_done"] == len(bucket["uris"])
    assert summary["errors_total_by_reason"] == bucket["summary"]["errors_by_reason"]
    assert {u: storage.read_bytes(u) for u in output_shards(bucket["output"])} == before


def test_rerun_with_other_settings_is_refused(bucket):
    with pytest.raises(ValueError, match="prompt"):
        caption(_config(f"{bucket['root']}/images/", bucket["output"], prompt="Another prompt"))


def _cli(input: str, output: str, shard_size: int, max_new: int = MAX_NEW, batch_size: int = 8) -> list[str]:
    return [sys.executable, "-m", "phantom_ray.cli", "caption", "--input", input, "--output", output,
            "--model", "tiny-qwen2", "--max-new-tokens", str(max_new), "--batch-size", str(batch_size),
            "--shard-size", str(shard_size), "--num-gpus", "0", "--num-cpus", "0.5", "--decode-num-cpus", "0.5",
            "--decode-concurrency", "1", "--max-pixels", str(MAX_PIXELS), "--no-progress"]


def test_driver_sigkill_mid_run_then_rerun_equals_uninterrupted_run(bucket, ray_local, tmp_path):
    # one sub-prefix of the bucket (a third of the images), so that the driver runs stay short. The
    # killed run generates longer answers in small batches and small shards, so that it is still busy
    # when its first shard lands however fast the machine is; the uninterrupted reference is an
    # in-process run with the same generation settings (captions do not depend on the batch an image
    # landed in)
    prefix = f"{bucket['root']}/images/batch0/"
    uris = [u for u in bucket["uris"] if u.startswith(prefix)]
    output = f"{bucket['root']}/captions/killed"
    reference = f"{bucket['root']}/captions/kill-reference"
    max_new, shard_size = 48, 2
    caption(_config(prefix, reference, generation=SamplingParams(max_tokens=max_new)))
    n_shards = math.ceil(len(uris) / shard_size)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "driver1.log", "wb")
    proc = subprocess.Popen(_cli(prefix, output, shard_size, max_new, batch_size=2), cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        at_kill = 0
        while time.monotonic() < deadline and proc.poll() is None:
            at_kill = len(output_shards(output))
            if at_kill:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"driver exited before any shard appeared: {(tmp_path / 'driver1.log').read_text()[-3000:]}"
        assert at_kill, "no shard appeared within 240 s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    after_kill = len(output_shards(output))
    assert 0 < after_kill < n_shards, f"{after_kill} of {n_shards} shards at the kill: the run was not interrupted"
    done_at_kill = len(read_outputs(output))

    rerun = subprocess.run(_cli(prefix, output, shard_size, max_new, batch_size=2), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["images_already_done"] == done_at_kill and summary["shards_written"] == n_shards - after_kill
    assert summary["images_processed"] == len(uris) - done_at_kill
    assert len(output_shards(output)) == n_shards
    killed = _rows_by_uri(output)
    uninterrupted = _rows_by_uri(reference)
    assert sorted(killed) == uris
    assert killed == uninterrupted


def test_manifest_input_jsonl_output_and_unreadable_images(ray_local, tmp_path):
    images = tmp_path / "data"
    uris = _write_images(str(images), 6)
    rel = [os.path.relpath(u, images) for u in uris]
    manifest = images / "manifest.jsonl"
    missing = "images/gone.png"
    lines = [json.dumps({"image_uri": r}) for r in rel] + [json.dumps({"image_uri": missing}), json.dumps(rel[0])]
    manifest.write_text("\n".join(lines) + "\n")
    assert list_inputs(str(manifest)) == sorted(uris + [str(images / missing)])  # relative to the manifest, deduped
    out = str(tmp_path / "out")
    summary = caption(_config(str(manifest), out, format="jsonl", shard_size=4))
    assert summary["images"] == len(uris) + 1
    rows = _rows_by_uri(out)
    assert sorted(rows) == sorted(uris + [str(images / missing)])
    assert rows[str(images / missing)]["error"] == "unreadable_image"
    assert all(p.endswith(".jsonl") for p in output_shards(out))
    assert sum(1 for r in rows.values() if r["error"] is None) == 6


def test_parquet_manifest_and_missing_column_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"uri": ["s3://b/x/2.png", "s3://b/x/1.png"], "other": [1, 2]}), tmp_path / "m.parquet")
    assert list_inputs(str(tmp_path / "m.parquet")) == ["s3://b/x/1.png", "s3://b/x/2.png"]
    pq.write_table(pa.table({"name": ["a.png"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no image column.*name"):
        list_inputs(str(tmp_path / "bad.parquet"))
    with pytest.raises(FileNotFoundError, match="no images"):
        list_inputs(str(tmp_path))


def test_shard_plan_is_stable_when_finished_groups_are_removed():
    uris = [f"s3://b/img{i:05d}.png" for i in range(103)]
    full = plan_groups(uris, 10, "parquet")
    assert len(full) == 11 and [len(g) for _, g in full][-1] == 3
    assert len({name for name, _ in full}) == 11
    done = {u for k in (0, 3, 4, 10) for u in full[k][1]}
    rest = plan_groups([u for u in reversed(uris) if u not in done], 10, "parquet")
    assert rest == [full[k] for k in range(11) if k not in (0, 3, 4, 10)]


@pytest.mark.parametrize("bad", [dict(format="csv"), dict(batch_size=0), dict(min_replicas=3, max_replicas=2),
                                 dict(num_gpus=-1), dict(shard_size=0)])
def test_caption_config_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        _config("in", "out", **bad)


def test_cli_and_job_parsers_accept_the_interface_flags():
    import importlib.util

    from phantom_ray.cli import build_parser
    from phantom_ray.infer.cli import config_from_args

    argv = ["caption", "--input", "s3://b/images/", "--output", "s3://b/captions/", "--model", "tiny-qwen2",
            "--prompt", "What is shown?", "--max-new-tokens", "7", "--batch-size", "16", "--min-replicas", "1",
            "--max-replicas", "4", "--num-gpus", "0.5", "--format", "jsonl"]
    args = build_parser(argv).parse_args(argv)
    cfg = config_from_args(args)
    assert (cfg.prompt, cfg.generation.max_tokens, cfg.batch_size, cfg.min_replicas, cfg.max_replicas,
            cfg.num_gpus, cfg.format) == ("What is shown?", 7, 16, 1, 4, 0.5, "jsonl")
    spec = importlib.util.spec_from_file_location("_job_caption", REPO / "jobs" / "caption.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert "ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/caption.py" in job.__doc__
    assert config_from_args(job.build_parser().parse_args(argv[1:])) == cfg
