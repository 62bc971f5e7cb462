"""phantom_ray.storage on a local directory and on moto S3 (same behaviour for both)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phantom_ray import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/some/prefix"


def test_join_and_is_s3():
    assert storage.join("s3://b/p/", "x", "/y.parquet") == "s3://b/p/x/y.parquet"
    assert storage.join("/tmp/a", "b") == os.path.join("/tmp/a", "b")
    assert storage.is_s3("s3://b") and not storage.is_s3("/tmp/s3://")
    assert storage.split_s3("s3://bucket/a/b/") == ("bucket", "a/b")
    with pytest.raises(ValueError, match="bucket"):
        storage.split_s3("s3:///key")


def test_roundtrip_list_exists(root):
    assert not storage.exists(root)
    assert storage.list_files(root) == []
    storage.write_bytes_atomic(storage.join(root, "a", "x.parquet"), b"1")
    storage.write_bytes_atomic(storage.join(root, "b.json"), b"22")
    storage.write_bytes_atomic(storage.join(root, "_hidden", "h.parquet"), b"3")
    storage.write_bytes_atomic(storage.join(root, ".tmp.parquet"), b"4")
    assert storage.exists(root)
    assert storage.exists(storage.join(root, "a", "x.parquet"))
    assert not storage.exists(storage.join(root, "nope.json"))
    assert storage.read_bytes(storage.join(root, "b.json")) == b"22"
    assert storage.size(storage.join(root, "b.json")) == 2
    assert storage.list_files(root) == [storage.join(root, "a", "x.parquet"), storage.join(root, "b.json")]
    assert storage.list_files(root, suffixes=".parquet") == [storage.join(root, "a", "x.parquet")]
    # a file URI lists as itself
    assert storage.list_files(storage.join(root, "b.json")) == [storage.join(root, "b.json")]
    storage.write_bytes_atomic(storage.join(root, "b.json"), b"overwritten")
    assert storage.read_text(storage.join(root, "b.json")) == "overwritten"
    storage.delete(storage.join(root, "b.json"))
    assert not storage.exists(storage.join(root, "b.json"))
    with pytest.raises(FileNotFoundError, match="b.json"):
        storage.read_bytes(storage.join(root, "b.json"))


def test_local_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = str(tmp_path / "shard.parquet")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes_atomic(target, b"x" * 1000)
    assert os.listdir(tmp_path) == []


def test_upload_download_dir(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("hello")
    (src / "g.bin").write_bytes(b"\x00\x01")
    storage.upload_dir(str(src), storage.join(root, "up"))
    assert storage.list_files(storage.join(root, "up")) == [
        storage.join(root, "up", "g.bin"), storage.join(root, "up", "sub", "f.txt")]
    dest = storage.download_dir(storage.join(root, "up"), str(tmp_path / "dest"))
    assert (tmp_path / "dest" / "sub" / "f.txt").read_text() == "hello"
    assert (tmp_path / "dest" / "g.bin").read_bytes() == b"\x00\x01"
    assert dest == str(tmp_path / "dest")


def test_pyarrow_fs_reads_what_storage_wrote(root):
    table = pa.table({"a": [1, 2, 3]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    uri = storage.join(root, "t.parquet")
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())
    fs, path = storage.pyarrow_fs(uri)
    assert pq.read_table(path, filesystem=fs).column("a").to_pylist() == [1, 2, 3]
    if storage.is_s3(uri):
        assert path == uri[len("s3://"):]
        assert fs.type_name == "s3"
