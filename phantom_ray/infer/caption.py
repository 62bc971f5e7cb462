"""Batch captioning of a bucket of images with Ray Data, exactly once and resumable.

Stages::

    list the input (prefix filtered by image extension, or a parquet/JSONL manifest of URIs)
      -> drop images already in the outputs; sort; chunk into groups of ``shard_size``  (driver)
      -> read bytes + decode + tile + tokenize                       map_batches, CPU tasks
      -> generate                                                     map_batches, autoscaling actor
                                                                      pool (min..max replicas), the
                                                                      model loaded once per actor
      -> rows of one group complete -> one output shard, written atomically   (driver)

Output, under ``--output``::

    part-<hash of the group's sorted URIs>.parquet|.jsonl   one row per input image
    _job.json       model, prompt, generation settings and format of this output (checked on re-run)
    _summary.json   the last run's summary (images, errors by reason, tokens/s, wall time)

Rows: ``image_uri``, ``caption`` (null on error), ``model``, ``prompt``, ``generation`` (JSON of the
settings), ``num_tiles``, ``tokens_generated``, ``finish_reason``, ``error`` (reason code, null
when fine), ``error_detail``.

Exactly once: the images already present in output shards are found by reading their
``image_uri`` column, the rest is sorted and chunked, and a shard is written only when every row of
its group is back. A re-run after a crash therefore skips the finished groups and re-chunks the
rest into the very same groups (whole groups are removed from a sorted list, so the boundaries of
the others do not move), and an image never lands in two shards. Bad images (undecodable, empty,
too large) become error rows and never stop the job.

The same two stages serve the eval job: :func:`phantom_ray.eval.predict.make_predict_fn` sends
benchmark items through them.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from phantom_ray import storage
from phantom_ray.infer.api import Generation, SamplingParams
from phantom_ray.infer.torch_engine import error_detail
from phantom_ray.loader import is_preset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".parquet", ".jsonl", ".ndjson")
MANIFEST_COLUMNS = ("image_uri", "uri", "image", "path", "url", "file")
FORMATS = ("parquet", "jsonl")
JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
DECODE_MEMORY_BYTES = 512 * 1024 * 1024  # reserved per decode task (an 8K x 8K RGB image is 200 MB decoded)
DEFAULT_PROMPT = "Describe the image in detail."


@dataclass
class CaptionConfig:
    """Everything a captioning run needs; the CLI flags map 1:1 onto these fields."""

    input: str
    output: str
    model: str
    prompt: str = DEFAULT_PROMPT
    generation: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=128))
    batch_size: int = 8                  # images per generate call (and per actor batch)
    min_replicas: int = 1                # autoscaling actor pool bounds
    max_replicas: int = 1
    num_gpus: float | None = None        # per replica; fractional shares a GPU; None: 1 if the cluster has GPUs
    num_cpus: float = 1.0                # per replica
    decode_num_cpus: float = 1.0         # per decode task
    decode_concurrency: int | None = None  # most decode tasks at once (None: as resources allow)
    format: str = "parquet"
    shard_size: int = 1000               # images per output shard
    max_pixels: int | None = None        # default: the processor's (8192 x 8192)
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    dtype: str = "auto"                  # auto: bfloat16 on GPU, float32 on CPU
    attn_implementation: str = "sdpa"
    seed: int = 0                        # preset weights; sampling generators
    max_length: int = 4096
    progress: bool = True

    def __post_init__(self):
        if not self.input:
            raise ValueError("input: give a prefix/directory of images or a manifest (parquet/JSONL) of image URIs")
        if not self.output:
            raise ValueError("output: give a local directory or s3://bucket/prefix for the caption shards")
        if not self.model:
            raise ValueError("model: give a preset name, a checkpoint directory or an s3:// checkpoint")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        for name in ("batch_size", "shard_size", "min_replicas", "max_replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0, got {self.num_gpus}")
        if self.num_cpus <= 0 or self.decode_num_cpus <= 0:
            raise ValueError("num_cpus and decode_num_cpus must be > 0")
        if isinstance(self.generation, dict):
            self.generation = SamplingParams(**self.generation)

    def job_record(self) -> dict[str, Any]:
        """What must match for a re-run to extend an existing output."""
        return {"model": self.model, "prompt": self.prompt, "generation": self.generation.to_dict(),
                "format": self.format, "shard_size": self.shard_size}


# ---- listing -----------------------------------------------------------------------------------

def _manifest_uris(uri: str) -> list[str]:
    data = storage.read_bytes(uri)
    base = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(os.path.abspath(uri))
    values: list[Any] = []
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        col = next((c for c in MANIFEST_COLUMNS if c in table.column_names), None)
        if col is None:
            raise ValueError(f"manifest {uri}: no image column; expected one of {', '.join(MANIFEST_COLUMNS)} "
                             f"(columns: {', '.join(table.column_names)})")
        values = table.column(col).to_pylist()
    else:
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"manifest {uri} line {n}: not JSON ({exc})") from exc
            if isinstance(rec, dict):
                col = next((c for c in MANIFEST_COLUMNS if c in rec), None)
                if col is None:
                    raise ValueError(f"manifest {uri} line {n}: no image field; expected one of "
                                     f"{', '.join(MANIFEST_COLUMNS)}")
                rec = rec[col]
            values.append(rec)
    out = []
    for n, v in enumerate(values):
        if not isinstance(v, str) or not v:
            raise ValueError(f"manifest {uri} row {n}: image URI must be a non-empty string, got {v!r}")
        if not (storage.is_s3(v) or os.path.isabs(v)):
            v = storage.join(base, v)
        out.append(v)
    return out


def list_inputs(uri: str) -> list[str]:
    """Sorted, de-duplicated image URIs of a prefix/directory (by extension), a single image, or a
    parquet/JSONL manifest (column/field ``image_uri``, ``uri``, ``image``, ``path``, ``url`` or
    ``file``; relative paths are resolved against the manifest's directory)."""
    uri = str(uri)
    if uri.lower().endswith(MANIFEST_EXTENSIONS):
        uris = _manifest_uris(uri)
    else:
        uris = storage.list_files(uri, suffixes=tuple(e for x in IMAGE_EXTENSIONS for e in (x, x.upper())))
    if not uris:
        raise FileNotFoundError(f"no images under {uri} (extensions {', '.join(IMAGE_EXTENSIONS)}) "
                                f"and not a manifest ({', '.join(MANIFEST_EXTENSIONS)})")
    return sorted(set(uris))


def plan_groups(todo: list[str], shard_size: int, fmt: str) -> list[tuple[str, list[str]]]:
    """Sorted URIs -> [(shard name, group)]; the name is a hash of the group's URIs."""
    todo = sorted(todo)
    out = []
    for start in range(0, len(todo), shard_size):
        group = todo[start:start + shard_size]
        digest = hashlib.sha256("\n".join(group).encode()).hexdigest()[:16]
        out.append((f"part-{digest}.{fmt}", group))
    return out


# ---- outputs -----------------------------------------------------------------------------------

def output_schema():
    import pyarrow as pa

    return pa.schema([
        ("image_uri", pa.string()), ("caption", pa.string()), ("model", pa.string()), ("prompt", pa.string()),
        ("generation", pa.string()), ("num_tiles", pa.int32()), ("tokens_generated", pa.int32()),
        ("finish_reason", pa.string()), ("error", pa.string()), ("error_detail", pa.string()),
    ])


def _encode_shard(rows: list[dict], fmt: str) -> bytes:
    rows = sorted(rows, key=lambda r: r["image_uri"])
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=output_schema()), sink)
    return sink.getvalue().to_pybytes()


def read_shard(uri: str, columns: list[str] | None = None) -> list[dict]:
    data = storage.read_bytes(uri)
    if uri.endswith(".jsonl"):
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        return [{c: r.get(c) for c in columns} for r in rows] if columns else rows
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data), columns=columns).to_pylist()


def output_shards(output: str, fmt: str | None = None) -> list[str]:
    if not storage.exists(output):
        return []
    suffixes = (f".{fmt}",) if fmt else tuple(f".{f}" for f in FORMATS)
    return [u for u in storage.list_files(output, suffixes=suffixes) if storage.basename(u).startswith("part-")]


def read_outputs(output: str, columns: list[str] | None = None) -> list[dict]:
    """Every row of every output shard under ``output`` (tests, tools)."""
    rows = []
    for uri in output_shards(output):
        rows += read_shard(uri, columns)
    return rows


def _check_job(cfg: CaptionConfig) -> None:
    uri = storage.join(cfg.output, JOB_FILE)
    mine = cfg.job_record()
    if storage.exists(uri):
        theirs = json.loads(storage.read_text(uri))
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        if diff:
            raise ValueError(
                f"{cfg.output} holds captions made with other settings ({', '.join(diff)} differ: "
                f"{ {k: theirs.get(k) for k in diff} } vs { {k: mine[k] for k in diff} }); "
                "use a new --output or the same settings to resume")
        return
    storage.write_text_atomic(uri, json.dumps(mine, indent=2) + "\n")


# ---- stage 1: read + decode + tile + tokenize (CPU tasks) --------------------------------------

def load_processor(model_id: str, max_length: int, max_pixels: int | None):
    """The model's processor without its weights (config.json + tokenizer files only); cached per
    worker process, so a decode task pays for the tokenizer once."""
    from phantom_ray.loader import load_processor as _load

    return _load(model_id, max_length, max_pixels)


def _decoded_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("max_new_tokens", pa.int32()),
        ("input_ids", pa.list_(pa.int32())), ("pixel_values", pa.binary()), ("pixel_shape", pa.list_(pa.int32())),
        ("num_tiles", pa.int32()), ("error", pa.string()), ("error_detail", pa.string()),
    ])


def _read_image(row: dict, max_image_bytes: int) -> bytes | None:
    from phantom_ray.processing import ImageError

    if row.get("image") is not None:
        data = bytes(row["image"])
    elif row.get("uri"):
        uri = row["uri"]
        try:
            data = storage.read_bytes(uri)
        except OSError as exc:  # FileNotFoundError, PermissionError, network
            raise ImageError("unreadable_image", f"cannot read {uri}: {exc}") from exc
    else:
        return None
    if len(data) > max_image_bytes:
        raise ImageError("image_too_large", f"{row.get('uri') or 'image'} is {len(data)} bytes, over "
                                            f"--max-image-bytes {max_image_bytes}")
    return data


def decode_batch(batch, model_id: str, max_length: int, max_pixels: int | None, max_image_bytes: int,
                 env: dict[str, str] | None = None):
    """Rows (key, shard, uri | image bytes, prompt, max_new_tokens) -> tokenized prompts and
    float32 pixel values; a bad image or prompt becomes a row with ``error`` set."""
    import numpy as np
    import pyarrow as pa

    from phantom_ray.processing import ProcessingError

    if env:
        os.environ.update(env)
    processor = load_processor(model_id, max_length, max_pixels)
    out = []
    for row in batch.to_pylist():
        rec = {"key": row["key"], "shard": row.get("shard"), "max_new_tokens": row.get("max_new_tokens"),
               "input_ids": None, "pixel_values": None, "pixel_shape": None, "num_tiles": 0,
               "error": None, "error_detail": None}
        try:
            data = _read_image(row, max_image_bytes)
            sample = processor.encode_prompt(row["prompt"], images=data)
        except ProcessingError as exc:
            rec["error"], rec["error_detail"] = exc.reason, error_detail(exc)
        else:
            rec["input_ids"] = sample.input_ids.tolist()
            rec["num_tiles"] = sum(sample.num_tiles)
            if sample.pixel_values is not None:
                pv = sample.pixel_values.numpy().astype(np.float32, copy=False)
                rec["pixel_values"] = pv.tobytes()
                rec["pixel_shape"] = list(pv.shape)
        out.append(rec)
    return pa.Table.from_pylist(out, schema=_decoded_schema())


# ---- stage 2: generate (actor pool) ------------------------------------------------------------

def _caption_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("caption", pa.string()), ("num_tiles", pa.int32()),
        ("tokens_generated", pa.int32()), ("finish_reason", pa.string()), ("error", pa.string()),
        ("error_detail", pa.string()),
    ])


class Captioner:
    """map_batches callable class: loads the model once per actor and generates for its batches."""

    def __init__(self, model_id: str, generation: dict, batch_size: int, dtype: str = "auto",
                 attn_implementation: str = "sdpa", seed: int = 0, max_length: int = 4096,
                 num_gpus: float = 0.0, torch_threads: int | None = None, env: dict[str, str] | None = None):
        import warnings

        import torch

        from phantom_ray.infer.api import load_engine
        from phantom_ray.loader import default_device

        if env:
            os.environ.update(env)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the driver already warned about preset weights
            self.engine = load_engine(model_id, backend="torch", device=default_device(num_gpus), dtype=dtype,
                                      attn_implementation=attn_implementation, seed=seed, max_length=max_length)
        self.generation = SamplingParams(**generation)
        self.batch_size = batch_size

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa
        import torch

        from phantom_ray.processing import Sample

        rows = batch.to_pylist()
        results: list[Generation | None] = [None] * len(rows)
        by_len: dict[int, list[int]] = collections.defaultdict(list)
        for i, r in enumerate(rows):
            if r["error"] is not None:
                results[i] = Generation(text=None, num_tiles=r["num_tiles"] or 0, error=r["error"],
                                        error_detail=r["error_detail"])
            else:
                by_len[r["max_new_tokens"] or self.generation.max_tokens].append(i)
        for max_new, idx in by_len.items():
            samples = []
            for i in idx:
                r = rows[i]
                pv = None
                if r["pixel_values"] is not None:
                    pv = torch.from_numpy(np.frombuffer(r["pixel_values"], dtype=np.float32).copy()
                                          .reshape(r["pixel_shape"]))
                samples.append(Sample(input_ids=torch.tensor(r["input_ids"], dtype=torch.long), labels=None,
                                      pixel_values=pv, num_tiles=[r["num_tiles"]] if pv is not None else []))
            gens = self.engine.generate_samples(samples, self.generation.replace(max_tokens=max_new),
                                                [rows[i]["key"] for i in idx], batch_size=self.batch_size)
            for i, g in zip(idx, gens):
                results[i] = g
        # a caption is the answer without surrounding whitespace
        out = [{"key": r["key"], "shard": r["shard"], "caption": g.text.strip() if g.text is not None else None,
                "num_tiles": g.num_tiles, "tokens_generated": g.completion_tokens, "finish_reason": g.finish_reason, "error": g.error,
                "error_detail": g.error_detail} for r, g in zip(rows, results)]
        return pa.Table.from_pylist(out, schema=_caption_schema())


@dataclass
class StageOptions:
    """Resources and settings of the two Ray Data stages (shared by captioning and eval)."""

    model: str
    generation: SamplingParams
    batch_size: int = 8
    min_replicas: int = 1
    max_replicas: int = 1
    num_gpus: float | None = None
    num_cpus: float = 1.0
    decode_num_cpus: float = 1.0
    decode_concurrency: int | None = None
    max_pixels: int | None = None
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    seed: int = 0
    max_length: int = 4096


def _ensure_ray(address: str | None = None):
    import ray

    if not ray.is_initialized():
        from phantom_ray.runtime import init_ray

        init_ray(address=address)
    return ray


def resolve_num_gpus(num_gpus: float | None) -> float:
    """None: one GPU per replica when the cluster has (or can autoscale to) GPUs, else CPU replicas."""
    if num_gpus is not None:
        return float(num_gpus)
    ray = _ensure_ray()
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_generation_dataset(rows: list[dict], opts: StageOptions):
    """rows (key, shard, uri | image, prompt, max_new_tokens) -> Ray Dataset of generation rows."""
    import ray
    from ray.data import ActorPoolStrategy

    _ensure_ray()
    num_gpus = resolve_num_gpus(opts.num_gpus)
    env = storage.storage_env()
    blocks = max(1, min(len(rows), math.ceil(len(rows) / opts.batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows its own
    # Decoding must not run inside (and hold) a GPU replica. Ray Data fuses consecutive maps whose
    # remote args are equal; the decode tasks' memory reservation (full-size images are decoded
    # there) differs from the actors' args, so the stages stay apart.
    ds = ds.map_batches(
        decode_batch, batch_format="pyarrow", batch_size=opts.batch_size, num_cpus=opts.decode_num_cpus,
        memory=DECODE_MEMORY_BYTES, concurrency=opts.decode_concurrency,
        fn_kwargs={"model_id": opts.model, "max_length": opts.max_length, "max_pixels": opts.max_pixels,
                   "max_image_bytes": opts.max_image_bytes, "env": env})
    # one torch thread per CPU the replica reserves, so replicas sharing a node do not oversubscribe it
    threads = max(1, int(opts.num_cpus)) if num_gpus == 0 else None
    return ds.map_batches(
        Captioner, batch_format="pyarrow", batch_size=opts.batch_size,
        compute=ActorPoolStrategy(min_size=opts.min_replicas, max_size=opts.max_replicas),
        num_gpus=num_gpus, num_cpus=opts.num_cpus,
        fn_constructor_kwargs={"model_id": opts.model, "generation": opts.generation.to_dict(),
                               "batch_size": opts.batch_size, "dtype": opts.dtype,
                               "attn_implementation": opts.attn_implementation, "seed": opts.seed,
                               "max_length": opts.max_length, "num_gpus": num_gpus, "torch_threads": threads,
                               "env": env})


# ---- the captioning job ------------------------------------------------------------------------

def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc="captioning", file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0, smoothing=0.1)


def caption(cfg: CaptionConfig, on_shard: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Caption every image of ``cfg.input`` not yet in ``cfg.output``; returns (and writes) the summary."""
    t0 = time.perf_counter()
    if is_preset(cfg.model):
        log.warning("model %r is a preset name: randomly initialised weights (seed %d); captions are noise",
                    cfg.model, cfg.seed)
    uris = list_inputs(cfg.input)
    _check_job(cfg)
    existing = output_shards(cfg.output, cfg.format)
    done: set[str] = set()
    prior_errors: collections.Counter = collections.Counter()
    for uri in existing:
        for r in read_shard(uri, ["image_uri", "error"]):
            done.add(r["image_uri"])
            if r["error"]:
                prior_errors[r["error"]] += 1
    wanted = set(uris)
    todo = [u for u in uris if u not in done]
    groups = plan_groups(todo, cfg.shard_size, cfg.format)
    log.info("%d images: %d already captioned in %d shards, %d to do in %d shards",
             len(uris), len(wanted & done), len(existing), len(todo), len(groups))
    gen_settings = json.dumps(cfg.generation.to_dict(), sort_keys=True)
    errors: collections.Counter = collections.Counter()
    tokens = 0
    written = 0
    if groups:
        rows = [{"key": u, "shard": name, "uri": u, "image": None, "prompt": cfg.prompt,
                 "max_new_tokens": cfg.generation.max_tokens} for name, group in groups for u in group]
        expected = {name: len(group) for name, group in groups}
        opts = StageOptions(model=cfg.model, generation=cfg.generation, batch_size=cfg.batch_size,
                            min_replicas=cfg.min_replicas, max_replicas=cfg.max_replicas, num_gpus=cfg.num_gpus,
                            num_cpus=cfg.num_cpus, decode_num_cpus=cfg.decode_num_cpus,
                            decode_concurrency=cfg.decode_concurrency, max_pixels=cfg.max_pixels,
                            max_image_bytes=cfg.max_image_bytes, dtype=cfg.dtype,
                            attn_implementation=cfg.attn_implementation, seed=cfg.seed, max_length=cfg.max_length)
        ds = build_generation_dataset(rows, opts)
        pending: dict[str, list[dict]] = collections.defaultdict(list)
        bar = _progress(len(todo), cfg.progress)
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for r in batch.to_pylist():
                    pending[r["shard"]].append({
                        "image_uri": r["key"], "caption": r["caption"], "model": cfg.model, "prompt": cfg.prompt,
                        "generation": gen_settings, "num_tiles": r["num_tiles"],
                        "tokens_generated": r["tokens_generated"], "finish_reason": r["finish_reason"],
                        "error": r["error"], "error_detail": r["error_detail"]})
                    tokens += r["tokens_generated"] or 0
                    if r["error"]:
                        errors[r["error"]] += 1
                    name = r["shard"]
                    if len(pending[name]) == expected[name]:
                        shard_rows = pending.pop(name)
                        if len({x["image_uri"] for x in shard_rows}) != len(shard_rows):
                            raise RuntimeError(f"shard {name}: duplicate rows from the pipeline")
                        uri = storage.join(cfg.output, name)
                        storage.write_bytes_atomic(uri, _encode_shard(shard_rows, cfg.format))
                        written += 1
                        if on_shard is not None:
                            on_shard(uri)
                if bar is not None:
                    bar.update(batch.num_rows)
        finally:
            if bar is not None:
                bar.close()
        if pending:
            missing = {k: expected[k] - len(v) for k, v in pending.items()}
            raise RuntimeError(f"the pipeline returned incomplete groups (rows missing per shard: {missing})")
    wall = time.perf_counter() - t0
    all_errors = prior_errors + errors
    summary = {
        "input": cfg.input, "output": cfg.output, "model": cfg.model, "prompt": cfg.prompt,
        "generation": cfg.generation.to_dict(), "format": cfg.format,
        "images": len(uris), "images_already_done": len(wanted & done), "images_processed": len(todo),
        "captioned": len(todo) - sum(errors.values()), "errors": sum(errors.values()),
        "errors_by_reason": dict(sorted(errors.items())),
        "errors_total_by_reason": dict(sorted(all_errors.items())),
        "shards_written": written, "shards_total": len(existing) + written,
        "tokens_generated": tokens, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "images_per_s": len(todo) / wall if wall > 0 else 0.0, "wall_s": wall,
        "replicas": [cfg.min_replicas, cfg.max_replicas], "batch_size": cfg.batch_size,
    }
    storage.write_text_atomic(storage.join(cfg.output, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    errs = ", ".join(f"{k}={v}" for k, v in s["errors_by_reason"].items()) or "none"
    return (f"{s['images']} images ({s['images_already_done']} already captioned, {s['images_processed']} now): "
            f"{s['captioned']} captions, {s['errors']} errors ({errs}); {s['tokens_generated']} tokens, "
            f"{s['tokens_per_s']:.1f} tokens/s, {s['images_per_s']:.2f} images/s, wall {s['wall_s']:.1f}s; "
            f"{s['shards_written']} shards written to {s['output']}")


__all__ = ["CaptionConfig", "caption", "list_inputs", "plan_groups", "read_outputs", "output_shards",
           "format_summary", "build_generation_dataset", "StageOptions", "Captioner",
           "decode_batch", "load_processor", "IMAGE_EXTENSIONS", "DEFAULT_PROMPT"]
