"""`phantom-ray data pack`: every input layout from moto S3 back to S3, bad rows, kill and resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phantom_ray import storage
from phantom_ray.data import pack as pack_mod
from phantom_ray.data.readers import InputFile, load_records
from phantom_ray.data.schema import ERROR_REASONS, make_sample_id
from phantom_ray.data.synth import LAYOUT_FILES, synthesize

N = 24


def _shard_rows(output: str, manifest: dict) -> list[dict]:
    rows = []
    for sh in manifest["shards"]:
        rows.extend(pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, sh["path"])))).to_pylist())
    return rows


def _corrupt(layout: str, root: str) -> dict[int, str]:
    """Break some records of a synthetic corpus in place; returns {input index: expected reason}."""
    uri = storage.join(root, LAYOUT_FILES[layout])
    if layout == "parquet":
        rows = pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()
        rows[3]["image"] = {"bytes": b"\x89PNG but not really", "path": "x.png"}
        rows[7]["answer"] = "   "
        rows[11]["image"] = {"bytes": rows[11]["image"]["bytes"][:40], "path": "trunc.png"}  # truncated
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink, row_group_size=5)
        storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())
        return {3: "undecodable_image", 7: "empty_answer", 11: "undecodable_image"}
    records = load_records(InputFile(uri, "x", "x"), layout)
    if layout == "jsonl":
        records = [json.loads(r) for r in records]
    expected = {}
    if layout == "text":
        records[2]["output"] = ""
        records[5] = ["not", "an", "object"]
        del records[9]["instruction"]
        expected = {2: "empty_answer", 5: "malformed_record", 9: "malformed_record"}
    else:
        def image_of(r):
            return r["image"][0] if isinstance(r["image"], list) else r["image"]
        storage.write_bytes_atomic(storage.join(root, image_of(records[1])), b"garbage, not an image")
        storage.delete(storage.join(root, image_of(records[4])))
        expected = {1: "undecodable_image", 4: "missing_image"}
        if layout == "triples":
            records[6]["rejected"] = ""
            expected[6] = "empty_answer"
        else:
            key = "messages" if layout == "jsonl" else "conversations"
            records[6][key] = records[6][key][:1]  # question without an answer
            expected[6] = "malformed_conversation"
    if layout == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in records) + "{not json\n"
        expected[len(records)] = "malformed_record"
        storage.write_text_atomic(uri, text)
    else:
        storage.write_text_atomic(uri, json.dumps(records))
    return expected


@pytest.mark.parametrize("layout", ["llava", "jsonl", "parquet", "text", "triples"])
def test_pack_each_layout_s3_to_s3(layout, s3_bucket, ray_local):
    src = f"{s3_bucket}/corpus"
    synthesize(src, num_samples=N, layout=layout, seed=1, heldout_fraction=0.0)
    expected_errors = _corrupt(layout, src)
    out = f"{s3_bucket}/packed"
    manifest = pack_mod.pack(storage.join(src, LAYOUT_FILES[layout]), layout, out,
                             shard_size_mb=0.0005 if layout == "text" else 0.004, executor="ray")
    n_input = N + (1 if layout == "jsonl" else 0)
    errors = pack_mod.read_errors(storage.join(out, "errors.parquet"))
    rows = _shard_rows(out, manifest)

    assert manifest["input_rows"] == n_input
    assert manifest["rows"] == n_input - len(errors) == len(rows)
    assert len(manifest["shards"]) > 1  # small shard size -> several shards, written by Ray tasks
    assert all(e["reason"] in ERROR_REASONS and e["detail"] for e in errors)
    assert {e["index"]: e["reason"] for e in errors} == expected_errors
    # nothing dropped silently: every input row is either packed or in the errors table, once
    source = LAYOUT_FILES[layout].rsplit(".", 1)[0]
    all_ids = {make_sample_id(source, LAYOUT_FILES[layout], i) for i in range(n_input)}
    packed_ids = [r["sample_id"] for r in rows]
    assert len(set(packed_ids)) == len(packed_ids)
    assert set(packed_ids) | {e["sample_id"] for e in errors} == all_ids
    assert not set(packed_ids) & {e["sample_id"] for e in errors}
    assert manifest["sources"][source]["rows"] == len(rows)

    import hashlib
    for r in rows:
        conv = json.loads(r["conversations"])
        assert conv[0]["role"] == "user" and "<image>" not in conv[0]["content"]
        if layout == "text":
            assert r["kind"] == "text" and r["image"] is None
        else:
            assert r["image"][:4] == b"\x89PNG" and r["image_sha256"] == hashlib.sha256(r["image"]).hexdigest()
        if layout == "triples":
            assert r["kind"] == "triple" and r["chosen"] and r["rejected"] and r["chosen"] != r["rejected"]


def _snapshot(output: str) -> tuple[dict, dict]:
    manifest = pack_mod.read_manifest(output)
    shards = {sh["path"]: [r["sample_id"] for r in _shard_rows(output, {"shards": [sh]})]
              for sh in manifest["shards"]}
    manifest = {k: v for k, v in manifest.items() if k not in ("pack_seconds",)}
    return manifest, shards


def test_interrupted_pack_resumes_to_identical_shards(s3_bucket, monkeypatch):
    src = f"{s3_bucket}/corpus"
    synthesize(src, num_samples=60, layout="llava", seed=2, heldout_fraction=0.0)
    inp = storage.join(src, LAYOUT_FILES["llava"])
    pack_mod.pack(inp, "llava", f"{s3_bucket}/reference", shard_size_mb=0.004, executor="local")
    ref_manifest, ref_shards = _snapshot(f"{s3_bucket}/reference")
    assert len(ref_shards) >= 4

    out = f"{s3_bucket}/resumed"
    real_write = storage.write_bytes_atomic
    calls = {"shards": 0}

    def crashing_write(uri, data):
        if "/shards/" in uri:
            calls["shards"] += 1
            if calls["shards"] == 3:
                raise KeyboardInterrupt("killed while writing the third shard")
        return real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        pack_mod.pack(inp, "llava", out, shard_size_mb=0.004, executor="local")
    monkeypatch.setattr(storage, "write_bytes_atomic", real_write)
    assert not storage.exists(storage.join(out, "manifest.json"))
    assert len(storage.list_files(storage.join(out, "shards"))) == 2

    pack_mod.pack(inp, "llava", out, shard_size_mb=0.004, executor="local")
    manifest, shards = _snapshot(out)
    assert shards == ref_shards
    ids = [i for v in shards.values() for i in v]
    assert len(ids) == len(set(ids)) == 60
    assert {k: v for k, v in manifest.items()} == ref_manifest | {"input": inp}
    # a third run finds the manifest and does nothing
    before = storage.read_text(storage.join(out, "manifest.json"))
    pack_mod.pack(inp, "llava", out, shard_size_mb=0.004, executor="local")
    assert storage.read_text(storage.join(out, "manifest.json")) == before
    with pytest.raises(ValueError, match="other settings"):
        pack_mod.pack(inp, "llava", out, shard_size_mb=1.0, executor="local")


def test_sigkilled_pack_process_resumes(tmp_path):
    src = str(tmp_path / "corpus")
    synthesize(src, num_samples=400, layout="jsonl", seed=3, heldout_fraction=0.0)
    inp = os.path.join(src, LAYOUT_FILES["jsonl"])
    out = str(tmp_path / "packed")
    cmd = [sys.executable, "-m", "phantom_ray.cli", "data", "pack", "--input", inp, "--layout", "jsonl",
           "--output", out, "--shard-size-mb", "0.0005", "--executor", "local"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = os.path.join(out, "_state", "chunks")
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(chunks) and len(os.listdir(chunks)) >= 5:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "manifest.json")), "pack finished before it could be killed"
    done_before = len(os.listdir(chunks))
    # whatever the kill left behind is hidden from readers (temp files start with '.')
    visible = storage.list_files(os.path.join(out, "shards"))
    for f in visible:
        pq.read_table(f)  # every visible shard is a complete parquet file

    manifest = pack_mod.pack(inp, "jsonl", out, shard_size_mb=0.0005, executor="local")
    ids = [r["sample_id"] for r in _shard_rows(out, manifest)]
    assert len(ids) == len(set(ids)) == manifest["rows"] == 400
    assert done_before < len(manifest["shards"])


# ---- hostile inputs: the bad-image corpus and paths outside the image root ------------------------

def _conv(i):
    return [{"from": "human", "value": f"<image>\nq{i}"}, {"from": "gpt", "value": f"a{i}"}]


def test_pack_bad_image_corpus_and_traversal_become_error_rows(tmp_path):
    """Every kind of bad image (bombs included) and every path outside --image-root is one error row
    with ingest's reason; the good images are packed; the pack completes."""
    from image_corpus import bad_images, good_images

    root = tmp_path / "corpus"
    (root / "img").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(good_images()["bmp"][0])
    os.symlink(tmp_path / "secret.png", root / "img" / "link.png")
    records, expected = [], {}
    for name, (data, reason) in bad_images().items():
        (root / "img" / f"{name}.jpg").write_bytes(data)
        expected[len(records)] = reason
        records.append({"id": name, "image": f"img/{name}.jpg", "conversations": _conv(name)})
    good = good_images()
    for name, (data, _, _) in good.items():
        (root / "img" / f"{name}.img").write_bytes(data)
        records.append({"id": name, "image": f"img/{name}.img", "conversations": _conv(name)})
    for path in ["../secret.png", str(tmp_path / "secret.png"), "img/link.png", "img/../../secret.png",
                 f"file://{tmp_path}/secret.png", "s3://other-bucket/x.png"]:
        expected[len(records)] = "image_outside_root"
        records.append({"id": path, "image": path, "conversations": _conv(path)})
    (root / "data.json").write_text(json.dumps(records))

    out = str(tmp_path / "packed")
    manifest = pack_mod.pack(str(root / "data.json"), "llava", out, image_root=str(root), executor="local")
    errors = pack_mod.read_errors(os.path.join(out, "errors.parquet"))
    got = {e["index"]: e["reason"] for e in errors}
    assert got == expected
    assert manifest["rows"] == len(good) and manifest["errors"] == len(expected)
    for e in errors:
        assert e["reason"] in ERROR_REASONS and e["detail"]
        assert " at 0x" not in e["detail"] and "BytesIO" not in e["detail"]
    rows = _shard_rows(out, manifest)
    assert sorted(r["orig_id"] for r in rows) == sorted(good)


def test_pack_s3_image_root_confines_keys(s3_bucket):
    from image_corpus import good_images

    png = good_images()["rgba_png"][0]
    storage.write_bytes_atomic(f"{s3_bucket}/corpus/img/a.png", png)
    storage.write_bytes_atomic(f"{s3_bucket}/secret/b.png", png)
    records = [
        {"id": "ok", "image": "img/a.png", "conversations": _conv(0)},
        {"id": "abs-ok", "image": f"{s3_bucket}/corpus/img/a.png", "conversations": _conv(1)},
        {"id": "dotdot", "image": "../secret/b.png", "conversations": _conv(2)},
        {"id": "other-key", "image": f"{s3_bucket}/secret/b.png", "conversations": _conv(3)},
        {"id": "other-bucket", "image": "s3://another-bucket/corpus/img/a.png", "conversations": _conv(4)},
        {"id": "prefix-sibling", "image": f"{s3_bucket}/corpusX/img/a.png", "conversations": _conv(5)},
        {"id": "local", "image": "/etc/hostname", "conversations": _conv(6)},
    ]
    storage.write_text_atomic(f"{s3_bucket}/corpus/data.json", json.dumps(records))
    out = f"{s3_bucket}/packed"
    manifest = pack_mod.pack(f"{s3_bucket}/corpus/data.json", "llava", out, image_root=f"{s3_bucket}/corpus",
                             executor="local")
    errors = pack_mod.read_errors(storage.join(out, "errors.parquet"))
    assert {e["index"]: e["reason"] for e in errors} == {i: "image_outside_root" for i in range(2, 7)}
    assert manifest["rows"] == 2
