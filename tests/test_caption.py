"""Batch captioning (phantom_ray.caption) on local Ray and moto S3, tiny preset.

Without Ray: canonical input identity (every spelling of a folder/prefix is one key), paginated
listing of a prefix with more keys than one listing page, the chunk plan (deterministic, reused,
manifest columns kept), refusal of another input into the same output, config and CLI parsing.

With Ray: a bucket of images with corrupt ones (every image in exactly one row, corrupt ones as
error rows; captions equal a direct generate per image; shards written by the workers); a manifest
with extra columns and per-row prompts (columns carried through unchanged); a worker SIGKILLed
mid-run (Ray Data restarts it, the run still writes every row once); the driver SIGKILLed mid-run
and re-run (outputs equal an uninterrupted run); a respelled rerun writes nothing.
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

import pytest
from helpers import noise_png

from phantom_ray import storage
from phantom_ray.caption import ADDED_COLUMNS, CaptionConfig
from phantom_ray.caption.job import run_caption as caption
from phantom_ray.caption.plan import chunk_uri, iter_plan_rows, make_plan, output_shards, read_outputs, read_shard

REPO = Path(__file__).resolve().parents[1]
N_GOOD = 60
MAX_NEW = 4
MAX_PIXELS = 100 * 100
PROMPT = "Describe the image in detail."
BAD = {"zero.jpg": "empty_image", "garbage.png": "undecodable_image", "truncated.png": "undecodable_image",
       "huge.png": "too_many_pixels"}


def _image(i: int, fmt: str = "PNG", size: tuple[int, int] | None = None) -> bytes:
    w, h = size or (16 + (i * 7) % 40, 16 + (i * 11) % 30)
    return noise_png(i, w, h, fmt)


def _write_images(root: str, n_good: int, bad: bool = True) -> list[str]:
    """Good images under root/images (nested, mixed formats) plus corrupt ones; returns canonical URIs."""
    uris = []
    for i in range(n_good):
        sub = f"batch{i % 3}/" if i % 2 else ""
        ext, fmt = ((".JPG", "JPEG") if i % 10 == 3 else (".jpeg", "JPEG") if i % 10 == 7 else (".png", "PNG"))
        uri = storage.join(root, "images", f"{sub}img{i:04d}{ext}")
        storage.write_bytes_atomic(uri, _image(i, fmt))
        uris.append(uri)
    if bad:
        files = {"zero.jpg": b"", "garbage.png": b"\x89PNG but not really" * 5, "truncated.png": _image(999)[:60],
                 "huge.png": _image(1000, size=(120, 120))}
        for name, data in files.items():
            uri = storage.join(root, "images", "bad", name)
            storage.write_bytes_atomic(uri, data)
            uris.append(uri)
    storage.write_text_atomic(storage.join(root, "images", "README.txt"), "not an image")  # filtered out
    storage.write_bytes_atomic(storage.join(root, "images", "_staging.png"), _image(5))  # hidden: skipped
    return sorted(storage.canonical_uri(u) for u in uris)


def _config(input: str, output: str, **kw) -> CaptionConfig:
    base = dict(input=input, output=output, model="tiny-qwen2", sampling={"max_tokens": MAX_NEW}, engine="torch",
                batch_size=8, min_replicas=1, max_replicas=1, num_gpus=0, num_cpus=1, shard_size=16,
                max_pixels=MAX_PIXELS, progress=False)
    base.update(kw)
    return CaptionConfig(**base)


def _rows_by(output: str, key: str = "image_uri") -> dict[str, dict]:
    rows = read_outputs(output)
    by = {r[key]: r for r in rows}
    assert len(by) == len(rows), "an input row appears in more than one output row"
    return by


@pytest.fixture(scope="module")
def reference_engine():
    from phantom_ray.infer.api import load_engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_engine("tiny-qwen2", backend="torch", device="cpu", seed=0)


def _reference(engine, uri: str, prompt: str = PROMPT, max_new: int = MAX_NEW) -> str:
    from helpers import greedy_reference  # a direct model.generate on one image, no engine code

    return greedy_reference(engine, storage.read_bytes(uri), prompt, max_new)


# ---- without Ray -------------------------------------------------------------------------------

def test_canonical_uri_makes_every_spelling_one_key(tmp_path, monkeypatch):
    real = tmp_path / "data" / "images"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    want = os.path.realpath(real)
    spellings = ["data/images", "data/images/", "./data/images", "data/./images//", "data/x/../images",
                 str(real), str(real) + "/", "link", "link/", f"file://{real}", f"file://localhost{real}/",
                 f"file:{real}"]
    assert {storage.canonical_uri(s) for s in spellings} == {want}
    s3 = ["s3://b/k/x", "s3://b//k/x", "s3://b/k/x/", "s3://b///k//x//"]
    assert {storage.canonical_uri(s) for s in s3} == {"s3://b/k/x"}
    assert storage.canonical_uri("s3://b/") == storage.canonical_uri("s3://b") == "s3://b"
    # S3 keeps dot segments literally: refused, as ingest refuses them (one meaning everywhere)
    for dotted in ("s3://b/k/./x", "s3://b/k/y/../x", "s3://b/../../k", "s3://b/k/%2e%2e/x"):
        with pytest.raises(ValueError, match="segments"):
            storage.canonical_uri(dotted)
    assert storage.canonical_uri("https://h/a/../b") == "https://h/a/../b"  # other URIs are not ours to rewrite
    with pytest.raises(ValueError):
        storage.canonical_uri("s3:///k")


def test_listing_a_prefix_larger_than_one_page_streams_every_key(s3_bucket):
    keys = [f"imgs/{'sub/' if i % 3 == 0 else ''}{i:03d}.png" for i in range(23)] + ["imgs/_hidden.png", "imgs/x.txt"]
    client = storage.s3_client()
    bucket = storage.split_s3(s3_bucket)[0]
    for k in keys:
        client.put_object(Bucket=bucket, Key=k, Body=b"x")
    calls = []

    def count(**kw):
        calls.append(1)

    client.meta.events.register("before-call.s3.ListObjectsV2", count)
    try:
        it = storage.iter_files(f"{s3_bucket}//imgs/", suffixes=".png", page_size=4)
        assert not calls  # a generator: nothing is listed before the first key is asked for
        first = next(it)
        assert len(calls) == 1
        got = [first, *it]
    finally:
        client.meta.events.unregister("before-call.s3.ListObjectsV2", count)
    want = sorted(f"{s3_bucket}/{k}" for k in keys if k.endswith(".png") and "_hidden" not in k)
    assert got == want  # S3's lexicographic order, every key once
    assert len(calls) == math.ceil(len(keys) / 4)  # one request per page of 4 keys


def test_local_listing_is_deterministic_and_lazy(tmp_path):
    uris = _write_images(str(tmp_path), 12)
    listed = list(storage.iter_files(str(tmp_path / "images") + "/", suffixes=(".png", ".jpeg", ".JPG", ".jpg")))
    assert sorted(listed) == uris and len(set(listed)) == len(listed)
    assert listed == list(storage.iter_files(f"file://{tmp_path}/images", suffixes=(".png", ".jpeg", ".JPG", ".jpg")))


def test_plan_chunks_in_listing_order_and_is_reused(tmp_path):
    uris = _write_images(str(tmp_path), 21, bad=False)
    cfg = _config(str(tmp_path / "images"), str(tmp_path / "out"), shard_size=8)
    plan = make_plan(cfg)
    assert (plan["chunks"], plan["rows"], plan["kind"]) == (3, 21, "listing")
    import pyarrow.parquet as pq

    chunks = [pq.read_table(chunk_uri(cfg.output, i)).column("image_uri").to_pylist() for i in range(3)]
    assert [len(c) for c in chunks] == [8, 8, 5] and sorted(sum(chunks, [])) == uris
    # a new image after the plan is complete is not seen: the plan is fixed
    storage.write_bytes_atomic(str(tmp_path / "images" / "zzz.png"), _image(77))
    assert make_plan(cfg) == plan
    with pytest.raises(ValueError, match="shard size"):
        make_plan(_config(str(tmp_path / "images"), str(tmp_path / "out"), shard_size=5))


def test_manifest_plans_keep_every_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.png").write_bytes(_image(1))
    rows = [{"path": "a.png", "id": 7, "tags": ["x", "y"], "q": "What?"},
            {"path": str(tmp_path / "sub" / ".." / "a.png"), "id": 8, "tags": [], "q": "Why?"},
            {"path": f"file://{tmp_path}/b.png", "id": 9, "tags": ["z"], "q": "How?"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "m.csv").write_text("path,id,q\n" + "".join(f"{r['path']},{r['id']},{r['q']}\n" for r in rows))
    canon = [str(tmp_path / "a.png"), str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    for name in ("m.parquet", "m.jsonl", "m.csv"):
        cfg = _config(str(tmp_path / name), str(tmp_path / f"out-{name}"), prompt_column="q", shard_size=2)
        got = [r for batch in iter_plan_rows(cfg, 2) for r in batch]
        assert [r["__phantom_uri"] for r in got] == canon, name
        for r, want in zip(got, rows):
            assert r["path"] == want["path"] and r["q"] == want["q"], name
            assert r["id"] == (str(want["id"]) if name == "m.csv" else want["id"]), name  # CSV values are text
    with pytest.raises(ValueError, match="no column 'prompt_text'"):
        list(iter_plan_rows(_config(str(tmp_path / "m.jsonl"), str(tmp_path / "o"), prompt_column="prompt_text"), 2))
    (tmp_path / "clash.jsonl").write_text(json.dumps({"uri": "a.png", "caption": "old"}) + "\n")
    with pytest.raises(ValueError, match="caption"):
        list(iter_plan_rows(_config(str(tmp_path / "clash.jsonl"), str(tmp_path / "o")), 2))
    (tmp_path / "nocol.jsonl").write_text(json.dumps({"name": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="no image column.*name"):
        list(iter_plan_rows(_config(str(tmp_path / "nocol.jsonl"), str(tmp_path / "o")), 2))
    with pytest.raises(FileNotFoundError, match="no images"):
        make_plan(_config(str(tmp_path / "empty"), str(tmp_path / "o2")))


def test_another_input_into_the_same_output_is_refused(tmp_path):
    _write_images(str(tmp_path / "one"), 3, bad=False)
    _write_images(str(tmp_path / "two"), 3, bad=False)
    out = str(tmp_path / "out")
    from phantom_ray.caption.job import check_job

    check_job(_config(str(tmp_path / "one" / "images"), out))
    check_job(_config(str(tmp_path / "one" / "images") + "/", out))  # the same input, respelled
    with pytest.raises(ValueError, match="another input.*two/images"):
        caption(_config(str(tmp_path / "two" / "images"), out))
    with pytest.raises(ValueError, match="prompt"):
        caption(_config(str(tmp_path / "one" / "images"), out, prompt="Another prompt"))


@pytest.mark.parametrize("bad", [dict(format="csv"), dict(batch_size=0), dict(min_replicas=3, max_replicas=2),
                                 dict(num_gpus=-1), dict(shard_size=0), dict(engine="tpu"), dict(extra_field=1),
                                 dict(sampling={"max_tokens": 0}), dict(model="")])
def test_caption_config_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        _config("in", "out", **bad)
    with pytest.raises(ValueError, match="input"):
        _config("", "out")


def test_config_resolves_paths_once_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    cfg = _config("images/", "./out//", model="ckpt", sampling={"max_tokens": 3, "temperature": 0.5, "stop": ["."]})
    assert (cfg.input, cfg.output, cfg.model) == (str(tmp_path / "images"), str(tmp_path / "out"), str(tmp_path / "ckpt"))
    from phantom_ray.infer.api import SamplingParams

    assert cfg.sampling == SamplingParams(max_tokens=3, temperature=0.5, stop=(".",))
    assert CaptionConfig.from_dict(cfg.to_dict()) == cfg
    assert _config("i", "o", model="org/hub-model").model == "org/hub-model"  # a hub id is not a path


def test_cli_and_job_parsers_accept_the_interface_flags():
    import importlib.util

    from phantom_ray.cli import build_parser
    from phantom_ray.caption.cli import config_from_args

    argv = ["caption", "--input", "s3://b/images/", "--output", "s3://b//captions/", "--model", "tiny-qwen2",
            "--prompt", "What is shown?", "--prompt-column", "question", "--max-tokens", "7", "--batch-size", "16",
            "--min-replicas", "1", "--max-replicas", "4", "--num-gpus", "0.5", "--format", "jsonl", "--engine", "torch",
            "--temperature", "0.7", "--seed", "3"]
    args = build_parser(argv).parse_args(argv)
    cfg = config_from_args(args)
    assert (cfg.input, cfg.output, cfg.prompt, cfg.prompt_column, cfg.sampling.max_tokens, cfg.sampling.temperature,
            cfg.sampling.seed, cfg.batch_size, cfg.min_replicas, cfg.max_replicas, cfg.num_gpus, cfg.format,
            cfg.engine) == ("s3://b/images", "s3://b/captions", "What is shown?", "question", 7, 0.7, 3, 16, 1, 4,
                            0.5, "jsonl", "torch")
    spec = importlib.util.spec_from_file_location("_job_caption", REPO / "jobs" / "caption.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert "ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/caption.py" in job.__doc__
    assert config_from_args(job.build_parser().parse_args(argv[1:])) == cfg


def test_the_old_max_new_tokens_flag_still_works_and_warns(capsys):
    import argparse

    from phantom_ray.caption.cli import add_arguments, config_from_args
    from phantom_ray.cli import build_parser

    argv = ["caption", "--input", "s3://b/images/", "--output", "s3://b/captions/", "--model", "tiny-qwen2"]
    with pytest.warns(DeprecationWarning, match="--max-tokens"):
        args = build_parser(argv).parse_args(argv + ["--max-new-tokens", "9"])
    assert config_from_args(args).sampling.max_tokens == 9
    assert "--max-new-tokens is deprecated; use --max-tokens" in capsys.readouterr().err
    help_text = add_arguments(argparse.ArgumentParser()).format_help()
    assert "--max-tokens" in help_text and "--max-new-tokens" not in help_text


def test_worker_stage_in_process_writes_one_row_per_image(tmp_path, reference_engine):
    """ChunkCaptioner without Ray (what each actor runs): every planned row once, corrupt images and
    a missing file as error rows with the one vocabulary's reasons, captions equal a direct generate."""
    from phantom_ray.caption.job import worker_job
    from phantom_ray.caption.stage import ChunkCaptioner

    uris = _write_images(str(tmp_path), 2)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image_uri": u}) + "\n" for u in uris + [str(tmp_path / "gone.png")]))
    cfg = _config(str(manifest), str(tmp_path / "out"), shard_size=64, io_threads=2)
    plan = make_plan(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        worker = ChunkCaptioner(worker_job(cfg, "torch"))
    counts = worker({"chunk": [0]})
    assert counts["chunk"] == [0] and counts["rows"] == [plan["rows"]] == [len(uris) + 1]
    rows = {r["image_uri"]: r for r in read_outputs(cfg.output)}
    assert rows[str(tmp_path / "gone.png")]["error"] == "missing_image"
    for name, reason in BAD.items():
        [uri] = [u for u in uris if u.endswith(name)]
        assert rows[uri]["error"] == reason and rows[uri]["caption"] is None, (name, rows[uri])
    good = [u for u in uris if "/bad/" not in u]
    assert all(rows[u]["caption"] == _reference(reference_engine, u) for u in good)
    assert worker({"chunk": [0]})["written"] == [False]  # a retried task finds its shard: same rows


# ---- with Ray ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bucket(s3_server, ray_local):
    import uuid

    import boto3

    name = f"caption-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    root = f"s3://{name}"
    uris = _write_images(root, N_GOOD)
    seen: list[tuple[int, bool]] = []
    out = f"{root}/captions/run1"

    def on_chunk(i: int) -> None:  # the shard is there when its counts reach the driver: a worker wrote it
        seen.append((i, storage.exists(f"{out}/part-{i:08d}.parquet")))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t0 = time.perf_counter()
        summary = caption(_config(f"{root}/images/", out, list_page_size=7), on_chunk=on_chunk)
        print(f"\nfirst pipeline run: {time.perf_counter() - t0:.1f}s")
    return {"root": root, "uris": uris, "summary": summary, "output": out, "seen": seen}


def test_every_image_appears_exactly_once_with_corrupt_ones_as_error_rows(bucket):
    rows = _rows_by(bucket["output"])
    assert sorted(rows) == bucket["uris"]
    for uri, r in rows.items():
        name = uri.rsplit("/", 1)[-1]
        assert set(r) == {"image_uri", *ADDED_COLUMNS}
        assert r["prompt"] == PROMPT
        if name in BAD:
            assert r["error"] == BAD[name], (uri, r)
            assert r["caption"] is None and r["error_detail"] and r["generated_tokens"] == 0
        else:
            assert r["error"] is None, (uri, r)
            assert isinstance(r["caption"], str) and 1 <= r["generated_tokens"] <= MAX_NEW
            assert r["prompt_tokens"] > 10 and r["finish_reason"] in ("stop", "length") and r["latency_s"] > 0
    n_chunks = math.ceil(len(bucket["uris"]) / 16)
    shards = output_shards(bucket["output"])
    assert [storage.basename(s) for s in shards] == [f"part-{i:08d}.parquet" for i in range(n_chunks)]
    assert sorted(bucket["seen"]) == [(i, True) for i in range(n_chunks)]
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(io.BytesIO(storage.read_bytes(shards[0]))).metadata[b"phantom_ray.caption"])
    assert meta["model"] == "tiny-qwen2" and meta["sampling"]["max_tokens"] == MAX_NEW and meta["input"].endswith("/images")
    s = json.loads(storage.read_text(f"{bucket['output']}/_summary.json"))
    assert s["images"] == s["images_processed"] == len(bucket["uris"]) and s["images_already_done"] == 0
    assert s["errors_by_reason"] == {"empty_image": 1, "too_many_pixels": 1, "undecodable_image": 2}
    assert s["captioned"] == N_GOOD and s["generated_tokens"] == sum(r["generated_tokens"] for r in rows.values())
    assert s["startup_s"] + s["steady_s"] == pytest.approx(s["wall_s"]) and s == bucket["summary"]


def test_pipeline_captions_equal_direct_generate_per_image(bucket, reference_engine):
    rows = _rows_by(bucket["output"])
    good = [u for u, r in rows.items() if r["error"] is None]
    assert len(good) == N_GOOD
    for uri in good[::4]:  # a quarter of them: the reference runs one image at a time
        assert rows[uri]["caption"] == _reference(reference_engine, uri), uri


def test_rerun_with_respelled_input_and_output_writes_nothing(bucket):
    before = {u: storage.read_bytes(u) for u in output_shards(bucket["output"])}
    root = bucket["root"]
    # S3 has no dot segments (a key holding "./" is another key, refused): empty segments and trailing slashes
    summary = caption(_config(f"{root}//images//", bucket["output"].replace("/captions/", "/captions//") + "/"))
    assert summary["images_processed"] == 0 and summary["shards_written"] == 0
    assert summary["images_already_done"] == len(bucket["uris"])
    assert {u: storage.read_bytes(u) for u in output_shards(bucket["output"])} == before


def test_manifest_columns_carried_through_with_per_row_prompts(ray_local, tmp_path, reference_engine):
    uris = _write_images(str(tmp_path / "data"), 5, bad=False)
    prompts = ["What colour dominates?", "Describe the image.", "Is it noisy?", None, "Count the shapes."]
    rows = [{"image": os.path.relpath(u, tmp_path / "data"), "row_id": 100 + i, "meta": {"k": i},
             "question": prompts[i]} for i, u in enumerate(uris)]
    rows.append({"image": "images/gone.png", "row_id": 999, "meta": {"k": -1}, "question": "Where?"})
    manifest = tmp_path / "data" / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "out")
    summary = caption(_config(str(manifest), out, prompt_column="question", format="jsonl", shard_size=4))
    assert summary["images"] == 6 and summary["errors_by_reason"] == {"missing_image": 1, "missing_prompt": 1}
    got = _rows_by(out, "row_id")
    assert sorted(got) == [r["row_id"] for r in rows]
    for want, uri in zip(rows, uris + [None]):
        r = got[want["row_id"]]
        assert {k: r[k] for k in want} == want  # every manifest column, unchanged
        assert set(r) == set(want) | set(ADDED_COLUMNS)
        if want["question"] and uri:
            assert r["error"] is None and r["caption"] == _reference(reference_engine, uri, want["question"])
    assert got[999]["error"] == "missing_image" and got[103]["error"] == "missing_prompt"
    assert all(p.endswith(".jsonl") for p in output_shards(out))


def _worker_pids() -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any("ChunkCaptioner" in part for part in (p.info["cmdline"] or [])):
                out.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def test_worker_sigkill_mid_run_loses_and_duplicates_nothing(bucket):
    # the model replica is killed with SIGKILL as soon as the first chunk is back (the next chunk is
    # then in its hands); Ray Data restarts the actor and retries the task, and the run ends with
    # every image in exactly one row, equal to the uninterrupted run's
    prefix = f"{bucket['root']}/images/"
    out = f"{bucket['root']}/captions/worker-killed"
    killed: list[int] = []

    def on_chunk(i: int) -> None:
        if not killed:
            pids = _worker_pids()
            assert pids, "no ChunkCaptioner worker process found"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)

    summary = caption(_config(prefix, out, shard_size=8, batch_size=4), on_chunk=on_chunk)
    assert killed
    assert summary["images_processed"] == len(bucket["uris"])
    got, want = _rows_by(out), _rows_by(bucket["output"])
    assert sorted(got) == bucket["uris"]
    drop = ("latency_s",)
    assert ({u: {k: v for k, v in r.items() if k not in drop} for u, r in got.items()}
            == {u: {k: v for k, v in r.items() if k not in drop} for u, r in want.items()})


def _cli(input: str, output: str, shard_size: int, max_new: int = MAX_NEW, batch_size: int = 8) -> list[str]:
    return [sys.executable, "-m", "phantom_ray.cli", "caption", "--input", input, "--output", output,
            "--model", "tiny-qwen2", "--engine", "torch", "--max-tokens", str(max_new), "--batch-size",
            str(batch_size), "--shard-size", str(shard_size), "--num-gpus", "0", "--num-cpus", "1",
            "--max-pixels", str(MAX_PIXELS), "--no-progress"]


def test_driver_sigkill_mid_run_then_rerun_equals_uninterrupted_run(bucket, ray_local, tmp_path):
    # one sub-prefix (a third of the images), longer answers in small chunks, so that the driver is
    # still busy when its first shard lands; the reference is an uninterrupted in-process run
    prefix = f"{bucket['root']}/images/batch0/"
    uris = [u for u in bucket["uris"] if u.startswith(prefix)]
    output = f"{bucket['root']}/captions/killed"
    reference = f"{bucket['root']}/captions/kill-reference"
    max_new, shard_size = 24, 2
    caption(_config(prefix, reference, sampling={"max_tokens": max_new}, shard_size=shard_size))
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
            time.sleep(0.05)
        assert proc.poll() is None, f"driver exited before any shard appeared: {(tmp_path / 'driver1.log').read_text()[-3000:]}"
        assert at_kill, "no shard appeared within 240 s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    # the killed driver's actor may finish the chunk in its hands before Ray reaps it; wait for quiet
    time.sleep(2.0)
    after_kill = len(output_shards(output))
    assert 0 < after_kill < n_shards, f"{after_kill} of {n_shards} shards at the kill: the run was not interrupted"
    done_at_kill = sum(len(read_shard(u)) for u in output_shards(output))

    rerun = subprocess.run(_cli(prefix + "/", output + "/", shard_size, max_new, batch_size=2), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["images_already_done"] + summary["images_processed"] == len(uris)
    assert summary["images_already_done"] >= done_at_kill
    assert len(output_shards(output)) == n_shards
    killed, uninterrupted = _rows_by(output), _rows_by(reference)
    assert sorted(killed) == uris
    drop = ("latency_s",)
    assert ({u: {k: v for k, v in r.items() if k not in drop} for u, r in killed.items()}
            == {u: {k: v for k, v in r.items() if k not in drop} for u, r in uninterrupted.items()})


def test_one_row_codec_round_trips_training_and_eval_pixels():
    import torch

    from phantom_ray.data.schema import decode_pixels, encode_pixels, row_to_sample

    pv = torch.randn(3, 3, 8, 8)
    data, shape = encode_pixels(pv, "float32")
    assert shape == [3, 3, 8, 8] and torch.equal(decode_pixels(data, shape, "float32"), pv)
    data16, _ = encode_pixels(pv, "float16")
    assert len(data16) == len(data) // 2
    assert torch.equal(decode_pixels(data16, shape, "float16"), pv.half().float())  # exactly the float16 rounding
    s = row_to_sample([1, 2, 3], None, data, shape, [3], "float32")
    assert s.input_ids.tolist() == [1, 2, 3] and s.labels is None and s.num_tiles == [3]
    assert torch.equal(s.pixel_values, pv)
    assert encode_pixels(None) == (None, None) and row_to_sample([1], [1], None, None, [], "float16").pixel_values is None
    with pytest.raises(ValueError, match="pixel_dtype"):
        encode_pixels(pv, "int8")
