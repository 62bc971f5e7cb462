"""Training input pipeline: packed shards in object storage -> Ray Data -> collated batches per worker.

Stages (one epoch)::

    read_parquet(shards, file order shuffled by (seed, epoch))          Ray Data read tasks
      -> select(kind for the task, source mixture weights)               map_batches (tasks, pyarrow)
      -> process_row: decode + tile + tokenize with PhantomProcessor     map_batches (actor pool,
         (bad rows -> errors output, not a job failure)                    num_preprocess_tasks)
      -> ray.train.get_dataset_shard("train")                            streaming split: every row
      -> iter_train_batches: local shuffle buffer + processor.collate     goes to exactly one worker

Reproducible: with ``deterministic`` (the default) two runs of the same config on the same number of
workers see the same rows in the same order on the same worker. File order and mixture are seeded
by (seed, epoch); Ray Data runs with ``preserve_order`` (:func:`ingest_options`), so read tasks,
the preprocessing actor pool and the split between workers emit blocks in input order (the
streaming split then hands each block to the worker with the fewest rows so far, and ignores
locality hints: the assignment depends on the data alone, not on which worker asked first); each
worker's local shuffle buffer is seeded by (seed, epoch, rank). The cost is some head-of-line
waiting in the stream; ``deterministic: false`` trades reproducibility for it.

Mixture: source ``s`` with ``n_s`` rows and weight ``w_s`` contributes
``epoch_samples * w_s / sum(w)`` rows per epoch: each row is kept ``floor(r_s)`` times plus once
more with probability ``frac(r_s)`` (``r_s = target_s / n_s``), decided by a hash of
(seed, epoch, sample_id), so the selection is deterministic and needs no global view. Without
weights every row is seen exactly once per epoch. A repeated row carries ``repeat`` = 0, 1, ...

Processed rows: ``sample_id``, ``source``, ``repeat``, ``num_tiles`` (list), ``pixel_values``
(raw bytes, ``pixel_dtype``, shape ``pixel_shape``; null without image) and for ``task="sft"``
``input_ids``/``labels`` (lists), for ``task="po"`` ``chosen_input_ids``/``chosen_labels``/
``rejected_input_ids``/``rejected_labels``.

Inside a Ray Train loop::

    shard = ray.train.get_dataset_shard("train")
    for batch in iter_train_batches(shard, processor, cfg.batch_size, task=cfg.task, ...):
        loss = model(**batch).loss
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import random
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from phantom_ray import storage
from phantom_ray.data.pack import read_manifest
from phantom_ray.data.schema import ERRORS_SCHEMA, RowError, encode_pixels, row_to_sample

log = logging.getLogger(__name__)

TASK_KINDS = {"sft": ("sft", "text"), "po": ("triple",)}


@dataclass
class DataConfig:
    """Training input configuration (``data:`` section of a training YAML)."""

    shards: str | list[str] = ""                 # pack output(s) holding manifest.json
    task: str = "sft"                            # "sft" (sft + text rows) | "po" (triples)
    mixture: dict[str, float] | None = None      # weight per source; None: every row once per epoch
    epoch_samples: int | None = None             # rows per epoch with a mixture (default: all rows)
    seed: int = 0
    shuffle: bool = True                         # file order + local buffer, seeded by (seed, epoch)
    shuffle_buffer_size: int = 256               # rows in each worker's local shuffle buffer
    deterministic: bool = True                   # same rows, same order, same worker every run (Ray Data
                                                 # preserve_order); false: a little faster, order varies
    batch_size: int = 8                          # per worker
    drop_last: bool = False
    num_preprocess_tasks: int = 2                # actors running decode + tile + tokenize
    preprocess_num_cpus: float = 1.0             # CPUs per preprocessing actor
    read_num_cpus: float = 1.0                   # CPUs per parquet read task (fractional on tiny hosts)
    preprocess_batch_size: int = 16              # rows per map_batches call
    prefetch_batches: int = 2                    # batches prefetched by each worker's iterator
    pixel_dtype: str = "float16"                 # pixel values in transit (float16 halves the bytes)
    padding_side: str = "right"
    model: str = "tiny-qwen2"                    # processor: preset name or checkpoint dir / s3:// URI
    max_length: int = 2048
    errors_output: str | None = None             # default: <first shards>/train_errors
    max_tokens_per_row: int | None = None        # packing: samples share rows of this many tokens; None: pad
    val_shards: str | list[str] | None = None    # held-out pack output(s) for validation in the loop
    val_max_samples: int = 64                    # validation samples per evaluation (per worker)

    def __post_init__(self):
        if isinstance(self.shards, str):
            self.shards = [self.shards] if self.shards else []
        if isinstance(self.val_shards, str):
            self.val_shards = [self.val_shards]
        if self.max_tokens_per_row is not None and self.max_tokens_per_row < 1:
            raise ValueError(f"data.max_tokens_per_row must be >= 1 (or null: no packing), got {self.max_tokens_per_row}")
        if not self.shards:
            raise ValueError("data.shards: give at least one pack output URI (the --output of `data pack`)")
        if self.task not in TASK_KINDS:
            raise ValueError(f"data.task={self.task!r}: expected one of {sorted(TASK_KINDS)}")
        for name in ("batch_size", "num_preprocess_tasks", "preprocess_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.prefetch_batches < 0 or self.shuffle_buffer_size < 0:
            raise ValueError("data.prefetch_batches and data.shuffle_buffer_size must be >= 0")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"data.padding_side={self.padding_side!r}: expected 'left' or 'right'")
        if self.pixel_dtype not in ("float16", "float32"):
            raise ValueError(f"data.pixel_dtype={self.pixel_dtype!r}: expected 'float16' or 'float32'")
        if self.mixture is not None:
            if not isinstance(self.mixture, dict) or not self.mixture:
                raise ValueError("data.mixture must be a mapping {source: weight}")
            for src, w in self.mixture.items():
                if not isinstance(w, (int, float)) or w < 0:
                    raise ValueError(f"data.mixture[{src!r}]={w!r}: weights must be numbers >= 0")
            if sum(self.mixture.values()) <= 0:
                raise ValueError("data.mixture: at least one weight must be > 0")
        if self.epoch_samples is not None and self.epoch_samples < 1:
            raise ValueError(f"data.epoch_samples must be >= 1, got {self.epoch_samples}")

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        if not isinstance(d, dict):
            raise ValueError(f"data config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown data config field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str, section: str | None = None) -> "DataConfig":
        """Load from a YAML file (local or s3://); ``section`` picks a key such as ``data``."""
        import yaml

        d = yaml.safe_load(storage.read_text(path)) or {}
        if section is not None:
            if section not in d:
                raise ValueError(f"{path}: no {section!r} section")
            d = d[section]
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def errors_uri(self, epoch: int) -> str:
        base = self.errors_output or storage.join(self.shards[0], "train_errors")
        return storage.join(base, f"epoch-{epoch:04d}")


# ---- reading and mixture ---------------------------------------------------------------------

def shard_files(cfg: DataConfig) -> list[dict]:
    """``[{"uri", "source", "rows"}]`` over all packs, from their manifests."""
    out = []
    for root in cfg.shards:
        for sh in read_manifest(root)["shards"]:
            out.append({"uri": storage.join(root, sh["path"]), "source": sh["source"], "rows": sh["rows"]})
    return out


def mixture_ratios(cfg: DataConfig, rows_per_source: dict[str, int]) -> dict[str, float]:
    """Expected copies of each row of a source per epoch (1.0 everywhere without a mixture)."""
    if cfg.mixture is None:
        return {s: 1.0 for s in rows_per_source}
    unknown = sorted(set(cfg.mixture) - set(rows_per_source))
    if unknown:
        raise ValueError(f"data.mixture names source(s) {unknown} not in the packs; sources: {sorted(rows_per_source)}")
    missing = sorted(set(rows_per_source) - set(cfg.mixture))
    if missing:
        raise ValueError(f"data.mixture has no weight for source(s) {missing}; give them a weight (0 drops a source)")
    total_w = sum(cfg.mixture.values())
    epoch = cfg.epoch_samples or sum(rows_per_source.values())
    return {s: (epoch * cfg.mixture[s] / total_w) / n if n else 0.0 for s, n in rows_per_source.items()}


def _unit(seed: int, epoch: int, sample_id: str) -> float:
    h = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def _select(batch, ratios: dict[str, float], kinds: tuple[str, ...], seed: int, epoch: int):
    """map_batches fn (pyarrow): keep rows of the task's kinds, repeated per the mixture."""
    import pyarrow as pa

    ids, sources, row_kinds = (batch.column(c).to_pylist() for c in ("sample_id", "source", "kind"))
    take, repeat = [], []
    for i, (sid, src, kind) in enumerate(zip(ids, sources, row_kinds)):
        if kind not in kinds:
            continue
        r = ratios.get(src, 0.0)
        copies = int(r) + (1 if _unit(seed, epoch, sid) < r - int(r) else 0)
        for k in range(copies):
            take.append(i)
            repeat.append(k)
    out = batch.take(pa.array(take, type=pa.int64()))
    return out.append_column("repeat", pa.array(repeat, type=pa.int32()))


def read_packed(cfg: DataConfig, epoch: int = 0):
    """The packed rows of one epoch (task kinds, mixture applied, file order shuffled)."""
    import ray.data

    files = shard_files(cfg)
    rows_per_source: dict[str, int] = {}
    for f in files:
        rows_per_source[f["source"]] = rows_per_source.get(f["source"], 0) + f["rows"]
    ratios = mixture_ratios(cfg, rows_per_source)
    files = [f for f in files if ratios[f["source"]] > 0 and f["rows"] > 0]
    if not files:
        raise ValueError(f"no shards left to read from {cfg.shards} (empty packs or all weights 0)")
    if cfg.shuffle:
        random.Random(f"{cfg.seed}-{epoch}").shuffle(files)
    schemes = {storage.is_s3(f["uri"]) for f in files}
    if len(schemes) > 1:
        raise ValueError("data.shards mixes local paths and s3:// URIs; put all packs in one store")
    fs, _ = storage.pyarrow_fs(files[0]["uri"])
    paths = [storage.pyarrow_fs(f["uri"])[1] for f in files]
    ds = ray.data.read_parquet(paths, filesystem=fs, num_cpus=cfg.read_num_cpus)
    return ds.map_batches(_select, batch_format="pyarrow", num_cpus=cfg.read_num_cpus, fn_kwargs={
        "ratios": ratios, "kinds": TASK_KINDS[cfg.task], "seed": cfg.seed, "epoch": epoch})


def ingest_options(cfg: DataConfig):
    """Ray Data execution options for the training datasets (``ray.train.DataConfig(execution_options=...)``):
    the driver's defaults, with ``preserve_order`` when ``cfg.deterministic``."""
    from ray.train import DataConfig as TrainDataConfig

    opts = TrainDataConfig.default_ingest_options()
    opts.preserve_order = bool(cfg.deterministic)
    return opts


# ---- per-row processing --------------------------------------------------------------------------

def default_processor_factory(model: str, max_length: int = 2048, **config_overrides):
    """PhantomProcessor for a preset name (``tiny-qwen2``) or a checkpoint directory / s3:// URI;
    ``config_overrides`` (presets only) set PhantomConfig fields, e.g. ``force_image_size=448``."""
    from phantom_ray.loader import is_preset, load_processor

    if config_overrides and not is_preset(model):
        raise ValueError(f"config overrides {sorted(config_overrides)} apply to presets only, not {model!r}")
    return load_processor(model, max_length, None, **config_overrides)


def _ids(t) -> list[int]:
    return t.tolist() if t is not None else None


def process_row(row: dict, processor, task: str = "sft", pixel_dtype: str = "float16") -> dict:
    """One packed row -> processed columns (see module doc). Raises ProcessingError/RowError."""
    image = row.get("image")
    images = [image] if image is not None else None
    try:
        messages = json.loads(row["conversations"])
    except (TypeError, json.JSONDecodeError) as exc:
        raise RowError("malformed_conversation", f"conversations is not valid JSON ({exc})") from None
    out: dict[str, Any] = {"sample_id": row["sample_id"], "source": row["source"], "repeat": int(row.get("repeat") or 0)}
    if task == "po":
        if row.get("chosen") is None or row.get("rejected") is None:
            raise RowError("malformed_record", "a PO row needs chosen and rejected answers")
        pair = processor.encode_triple(messages[0]["content"], row["chosen"], row["rejected"], image=image)
        out |= {"chosen_input_ids": _ids(pair.chosen.input_ids), "chosen_labels": _ids(pair.chosen.labels),
                "rejected_input_ids": _ids(pair.rejected.input_ids), "rejected_labels": _ids(pair.rejected.labels)}
        sample = pair.chosen
    else:
        sample = processor.encode(messages, images=images)
        out |= {"input_ids": _ids(sample.input_ids), "labels": _ids(sample.labels)}
    pixels, shape = encode_pixels(sample.pixel_values, pixel_dtype)
    out |= {"pixel_values": pixels, "pixel_shape": shape}
    out["num_tiles"] = list(sample.num_tiles)
    return out


def _error_classes() -> tuple[type[Exception], ...]:
    try:
        from phantom_ray.processing import ProcessingError
    except ImportError:  # processor package not installed: only our own row errors are expected
        return (RowError,)
    return (RowError, ProcessingError)


class Preprocess:
    """map_batches callable class: builds the processor once per actor, processes rows, writes the
    rows that fail to ``errors_uri`` (one small parquet file per batch with failures)."""

    def __init__(self, processor_factory: Callable[[], Any], task: str, pixel_dtype: str, errors_uri: str):
        self.processor = processor_factory()
        self.task, self.pixel_dtype, self.errors_uri = task, pixel_dtype, errors_uri
        self.errors_cls = _error_classes()

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.parquet as pq

        good, bad = [], []
        for row in batch.to_pylist():
            try:
                good.append(process_row(row, self.processor, self.task, self.pixel_dtype))
            except self.errors_cls as exc:
                bad.append({"sample_id": row.get("sample_id"), "source": row.get("source"), "index": -1,
                            "reason": getattr(exc, "reason", type(exc).__name__),
                            "detail": str(exc)[:2000]})
        if bad:
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(bad, schema=ERRORS_SCHEMA), sink)
            storage.write_bytes_atomic(storage.join(self.errors_uri, f"errors-{uuid.uuid4().hex}.parquet"),
                                       sink.getvalue().to_pybytes())
            log.warning("%d bad rows in a batch of %d (first: %s)", len(bad), len(batch), bad[0]["detail"])
        return pa.Table.from_pylist(good, schema=processed_schema(self.task))


@functools.lru_cache(maxsize=None)
def processed_schema(task: str):
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    cols = [("sample_id", pa.string()), ("source", pa.string()), ("repeat", pa.int32())]
    if task == "po":
        cols += [("chosen_input_ids", ints), ("chosen_labels", ints), ("rejected_input_ids", ints),
                 ("rejected_labels", ints)]
    else:
        cols += [("input_ids", ints), ("labels", ints)]
    cols += [("pixel_values", pa.binary()), ("pixel_shape", ints), ("num_tiles", ints)]
    return pa.schema(cols)


def build_train_dataset(cfg: DataConfig, epoch: int = 0, *, preprocess: bool = True,
                        processor_factory: Callable[[], Any] | None = None):
    """The epoch's ``ray.data.Dataset``: packed rows (``preprocess=False``) or processed rows."""
    from ray.data import ActorPoolStrategy

    ds = read_packed(cfg, epoch)
    if not preprocess:
        return ds
    factory = processor_factory or functools.partial(default_processor_factory, cfg.model, cfg.max_length)
    return ds.map_batches(
        Preprocess, batch_format="pyarrow", batch_size=cfg.preprocess_batch_size,
        fn_constructor_kwargs={"processor_factory": factory, "task": cfg.task, "pixel_dtype": cfg.pixel_dtype,
                               "errors_uri": cfg.errors_uri(epoch)},
        compute=ActorPoolStrategy(size=cfg.num_preprocess_tasks), num_cpus=cfg.preprocess_num_cpus,
        runtime_env=storage.storage_runtime_env())


# ---- per worker ------------------------------------------------------------------------------------

def _sample(ids, labels, pixel, shape, num_tiles, dtype):
    return row_to_sample(ids, labels, pixel, shape, num_tiles, dtype)


class CollateProcessed:
    """``iter_torch_batches`` collate_fn: processed numpy columns -> ``processor.collate(_pairs)``."""

    def __init__(self, processor, task: str = "sft", padding_side: str = "right", pixel_dtype: str = "float16",
                 max_tokens_per_row: int | None = None):
        self.processor, self.task, self.padding_side, self.dtype = processor, task, padding_side, pixel_dtype
        self.max_tokens_per_row = max_tokens_per_row  # set: pack the batch's samples into shared rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        from phantom_ray.processing import PairSample

        n = len(batch["sample_id"])
        pix, shapes, tiles = batch["pixel_values"], batch["pixel_shape"], batch["num_tiles"]
        if self.task == "po":
            pairs = []
            for i in range(n):
                c = _sample(batch["chosen_input_ids"][i], batch["chosen_labels"][i], pix[i], shapes[i], tiles[i], self.dtype)
                r = _sample(batch["rejected_input_ids"][i], batch["rejected_labels"][i], pix[i], shapes[i], tiles[i],
                            self.dtype)
                pairs.append(PairSample(chosen=c, rejected=r))
            if self.max_tokens_per_row:
                out = self.processor.pack_pairs(pairs, self.max_tokens_per_row)
            else:
                out = self.processor.collate_pairs(pairs, self.padding_side)
        else:
            samples = [_sample(batch["input_ids"][i], batch["labels"][i], pix[i], shapes[i], tiles[i], self.dtype)
                       for i in range(n)]
            if self.max_tokens_per_row:
                out = self.processor.pack(samples, self.max_tokens_per_row)
            else:
                out = self.processor.collate(samples, self.padding_side)
        out["sample_id"] = [str(s) for s in batch["sample_id"]]
        return out


def iter_train_batches(shard, processor, batch_size: int, *, task: str = "sft", padding_side: str = "right",
                       pixel_dtype: str = "float16", prefetch_batches: int = 2, shuffle_buffer_size: int = 0,
                       shuffle_seed: int | None = None, drop_last: bool = False) -> Iterator[dict]:
    """Collated model batches from a worker's dataset shard (``ray.train.get_dataset_shard``)."""
    return shard.iter_torch_batches(
        batch_size=batch_size, collate_fn=CollateProcessed(processor, task, padding_side, pixel_dtype),
        prefetch_batches=prefetch_batches, local_shuffle_buffer_size=shuffle_buffer_size or None,
        local_shuffle_seed=shuffle_seed if shuffle_buffer_size else None, drop_last=drop_last)


def iter_config_batches(shard, processor, cfg: DataConfig, epoch: int = 0, rank: int = 0) -> Iterator[dict]:
    """:func:`iter_train_batches` with every knob from ``cfg`` (shuffle seed from seed, epoch, rank)."""
    return iter_train_batches(
        shard, processor, cfg.batch_size, task=cfg.task, padding_side=cfg.padding_side, pixel_dtype=cfg.pixel_dtype,
        prefetch_batches=cfg.prefetch_batches, shuffle_buffer_size=cfg.shuffle_buffer_size if cfg.shuffle else 0,
        shuffle_seed=(cfg.seed * 1_000_003 + epoch * 1009 + rank) % 2**31, drop_last=cfg.drop_last)


def read_train_errors(cfg: DataConfig, epoch: int = 0) -> list[dict]:
    """Rows the preprocessing rejected in ``epoch`` (sample_id, source, reason, detail)."""
    from phantom_ray.data.pack import read_errors

    return read_errors(cfg.errors_uri(epoch))
