"""Training input pipeline: config, mixture weights, Ray Train sharding, bad rows, PO batches."""

from __future__ import annotations

import collections
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phantom_ray import storage
from phantom_ray.data.pack import pack
from phantom_ray.data.pipeline import (DataConfig, build_train_dataset, default_processor_factory,
                                       iter_config_batches, iter_train_batches, mixture_ratios, read_train_errors)
from phantom_ray.data.schema import PACKED_SCHEMA
from phantom_ray.data.synth import LAYOUT_FILES, synthesize


def test_data_config_from_yaml(tmp_path):
    p = tmp_path / "train.yaml"
    p.write_text("data:\n  shards: s3://b/packed\n  mixture: {a: 2, b: 1}\n  batch_size: 4\n  seed: 7\n")
    cfg = DataConfig.from_yaml(str(p), section="data")
    assert cfg.shards == ["s3://b/packed"] and cfg.mixture == {"a": 2, "b": 1} and cfg.batch_size == 4
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    p.write_text("shards: /x\nbatch_sise: 4\n")
    with pytest.raises(ValueError, match=r"train.yaml.*unknown data config field.*batch_sise"):
        DataConfig.from_yaml(str(p))
    with pytest.raises(ValueError, match="data.task"):
        DataConfig(shards="/x", task="dpo")
    with pytest.raises(ValueError, match=r"mixture\['a'\]"):
        DataConfig(shards="/x", mixture={"a": -1})
    cfg = DataConfig(shards="/x", mixture={"a": 1, "b": 3}, epoch_samples=400)
    assert mixture_ratios(cfg, {"a": 100, "b": 100}) == {"a": 1.0, "b": 3.0}
    with pytest.raises(ValueError, match=r"no weight for source\(s\) \['c'\]"):
        mixture_ratios(cfg, {"a": 1, "b": 1, "c": 1})
    with pytest.raises(ValueError, match=r"not in the packs"):
        mixture_ratios(cfg, {"a": 1})


@pytest.fixture(scope="module")
def text_packs(tmp_path_factory):
    """Two text-only sources (3000 and 600 rows) packed locally into one output each."""
    root = tmp_path_factory.mktemp("mix")
    outs = []
    for name, n, seed in (("big", 3000, 1), ("small", 600, 2)):
        src = str(root / f"src_{name}")
        synthesize(src, num_samples=n, layout="text", seed=seed, heldout_fraction=0.0)
        out = str(root / f"packed_{name}")
        pack(os.path.join(src, LAYOUT_FILES["text"]), "text", out, source=name, shard_size_mb=0.05,
             executor="local")
        outs.append(out)
    return outs


def test_mixture_weights_are_honoured(text_packs, ray_local):
    cfg = DataConfig(shards=text_packs, mixture={"big": 0.3, "small": 0.7}, epoch_samples=3000, seed=3)
    rows = build_train_dataset(cfg, epoch=0, preprocess=False).select_columns(
        ["sample_id", "source", "repeat"]).take_all()
    counts = collections.Counter(r["source"] for r in rows)
    assert abs(counts["big"] - 900) < 0.06 * 900, counts
    assert abs(counts["small"] - 2100) < 0.06 * 2100, counts  # 600 rows, each ~3.5 times
    assert len({(r["sample_id"], r["repeat"]) for r in rows}) == len(rows)
    assert max(r["repeat"] for r in rows if r["source"] == "small") == 3
    # the selection is a pure function of (seed, epoch, sample_id): the Ray run equals it, it is
    # reproducible and it changes with the epoch (checked without Ray to keep the test fast)
    from phantom_ray.data.pipeline import _select, mixture_ratios, shard_files

    table = pa.concat_tables([pq.read_table(f["uri"]) for f in shard_files(cfg)])
    ratios = mixture_ratios(cfg, {"big": 3000, "small": 600})
    key = lambda t: sorted(zip(t.column("sample_id").to_pylist(), t.column("repeat").to_pylist()))  # noqa: E731
    epoch0 = key(_select(table, ratios, ("text",), cfg.seed, 0))
    assert epoch0 == sorted((r["sample_id"], r["repeat"]) for r in rows)
    assert key(_select(table, ratios, ("text",), cfg.seed, 0)) == epoch0
    assert key(_select(table, ratios, ("text",), cfg.seed, 1)) != epoch0

    plain = build_train_dataset(DataConfig(shards=text_packs), preprocess=False).select_columns(["sample_id"]).take_all()
    ids = [r["sample_id"] for r in plain]
    assert len(ids) == len(set(ids)) == 3600


def test_two_train_workers_see_disjoint_halves(s3_bucket, ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # defined here so that cloudpickle ships it by value (workers cannot import this test module)
    def _train_loop(config):
        import ray.train

        from phantom_ray.data.pipeline import DataConfig, default_processor_factory, iter_config_batches

        cfg = DataConfig.from_dict(config["data"])
        rank = ray.train.get_context().get_world_rank()
        proc = default_processor_factory(cfg.model)
        seen, batches = [], 0
        for batch in iter_config_batches(ray.train.get_dataset_shard("train"), proc, cfg, epoch=0, rank=rank):
            assert batch["input_ids"].shape[0] == len(batch["sample_id"]) <= cfg.batch_size
            assert (batch["labels"] != -100).any()
            seen.extend(batch["sample_id"])
            batches += 1
        with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)
        ray.train.report({"rows": len(seen), "batches": batches})

    src = f"{s3_bucket}/corpus"
    synthesize(src, num_samples=48, layout="llava", seed=4, heldout_fraction=0.0)
    manifest = pack(storage.join(src, LAYOUT_FILES["llava"]), "llava", f"{s3_bucket}/packed",
                    shard_size_mb=0.004, executor="local")
    assert len(manifest["shards"]) >= 4
    # 2 CPUs: Ray Data 2.60's ListFiles task takes 1 CPU, so workers, read and preprocessing share
    # the other one (with 0.5 CPU workers the read never gets scheduled and fit() hangs)
    cfg = DataConfig(shards=f"{s3_bucket}/packed", batch_size=5, num_preprocess_tasks=1,
                     preprocess_num_cpus=0.25, read_num_cpus=0.25, shuffle_buffer_size=16)
    ds = build_train_dataset(cfg, epoch=0)
    trainer = TorchTrainer(
        _train_loop, train_loop_config={"data": cfg.to_dict(), "out": str(tmp_path)},
        datasets={"train": ds},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.25}),
        run_config=RunConfig(name="data-shard-test", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    a = json.load(open(tmp_path / "rank0.json"))
    b = json.load(open(tmp_path / "rank1.json"))
    assert a and b
    assert not set(a) & set(b)
    assert len(a) + len(b) == len(set(a) | set(b)) == 48
    all_ids = set(pq.read_table(
        storage.pyarrow_fs(f"{s3_bucket}/packed/shards")[1], filesystem=storage.pyarrow_fs(s3_bucket)[0]
    ).column("sample_id").to_pylist())
    assert set(a) | set(b) == all_ids


def _hand_pack(root: str, rows: list[dict]) -> None:
    """A pack written by hand (as if shards rotted after packing) to test the pipeline's error path."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=PACKED_SCHEMA), sink)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes_atomic(storage.join(root, "shards", "hand-00000-000.parquet"), data)
    manifest = {"shards": [{"path": "shards/hand-00000-000.parquet", "source": "hand", "rows": len(rows),
                            "bytes": len(data)}]}
    storage.write_text_atomic(storage.join(root, "manifest.json"), json.dumps(manifest))


def test_bad_rows_go_to_errors_output_and_po_batches(tmp_path, ray_local):
    import hashlib

    from phantom_ray.data.synth import render

    png = render("red", "circle", 1, "white", 64)
    conv = json.dumps([{"role": "user", "content": "What colour is the shape?"},
                       {"role": "assistant", "content": "red"}])
    good = dict(kind="sft", conversations=conv, chosen=None, rejected=None, image=png,
                image_sha256=hashlib.sha256(png).hexdigest(), orig_id=None, source="hand")
    rows = [dict(good, sample_id=f"ok{i}") for i in range(6)]
    rows.append(dict(good, sample_id="bad-image", image=b"\x89PNG\r\n\x1a\n-rotten"))
    rows.append(dict(good, sample_id="bad-json", conversations="[{not json"))
    rows.append(dict(good, sample_id="bad-empty", conversations=json.dumps(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}])))
    _hand_pack(str(tmp_path / "hand"), rows)
    cfg = DataConfig(shards=str(tmp_path / "hand"), num_preprocess_tasks=1, preprocess_num_cpus=0.5,
                     errors_output=str(tmp_path / "errors"), batch_size=4)
    proc = default_processor_factory(cfg.model)
    seen = []
    for batch in iter_config_batches(build_train_dataset(cfg).iterator(), proc, cfg):
        seen.extend(batch["sample_id"])
        assert batch["pixel_values"].shape[0] == int(batch["num_tiles"].sum())
    assert sorted(seen) == [f"ok{i}" for i in range(6)]
    errors = {e["sample_id"]: e["reason"] for e in read_train_errors(cfg)}
    assert errors == {"bad-image": "undecodable_image", "bad-json": "malformed_conversation",
                      "bad-empty": "empty_answer"}

    # PO: triples become (chosen, rejected) pairs sharing one image
    synthesize(str(tmp_path / "tri"), num_samples=6, layout="triples", seed=5, heldout_fraction=0.0)
    pack(str(tmp_path / "tri" / LAYOUT_FILES["triples"]), "triples", str(tmp_path / "tri_packed"), executor="local")
    cfg = DataConfig(shards=str(tmp_path / "tri_packed"), task="po", num_preprocess_tasks=1,
                     preprocess_num_cpus=0.5, batch_size=3, shuffle=False)
    batches = list(iter_train_batches(build_train_dataset(cfg).iterator(), proc, 3, task="po"))
    assert sum(len(b["sample_id"]) for b in batches) == 6
    for b in batches:
        n = len(b["sample_id"])
        assert b["input_ids"].shape[0] == 2 * n and b["image_repeat"] == 2
        assert b["pixel_values"].shape[0] == int(b["num_tiles"][:n].sum())
        assert not (b["input_ids"][:n] == b["input_ids"][n:]).all()
