"""Batch captioning of a bucket of images with Ray Data: a small driver, worker-written shards,
exactly once and resumable.

Stages::

    plan (driver, streaming)   list the input page by page (s3:// prefix or local folder, canonical
                               URIs) or stream a manifest (parquet/JSONL/CSV, every column kept);
                               cut it into chunks of ``shard_size`` rows in listing/manifest order;
                               write each chunk's rows to ``<output>/_plan/chunk-<i>.parquet`` and
                               then ``_plan/_plan.json`` (the plan is complete and fixed)
    caption (Ray Data actors)  one task per unfinished chunk on an autoscaling actor pool that holds
                               the one engine (``load_engine(model, backend=engine)``): read the
                               chunk, fetch and open its images (I/O threads, ahead of the model),
                               generate, write ``part-<i>.<fmt>`` atomically, return counts only
    count (driver)             progress bar, summary

Output, under ``--output``::

    part-00000000.parquet|.jsonl   chunk i's rows: the input columns unchanged (``image_uri`` for a
                                   listing, every manifest column for a manifest) plus ``caption``,
                                   ``prompt``, ``prompt_tokens``, ``generated_tokens``,
                                   ``finish_reason``, ``latency_s``, ``error``, ``error_detail``
    _plan/                         the chunk plan (rows of every chunk; ``_plan.json`` once complete)
    _job.json                      canonical input, model, prompt, sampling and format of this output
    _summary.json                  the last run's summary

The model and sampling settings are written once per output (``_job.json``, and the parquet
schema metadata key ``phantom_ray.caption``), not per row.

Exactly once: the plan is written once and reused by every rerun (a rerun never lists again), a
chunk's shard has a fixed name and is written in one atomic PUT/rename after all its rows are
generated, and a rerun (or a retried task: Ray Data restarts a killed actor and retries its task)
skips chunks whose shard exists. A SIGKILL of the driver or of a worker therefore loses at most
unfinished chunks, which the next run (or the retry) does again; no row is written twice. The
input is recorded canonically (:func:`phantom_ray.storage.canonical_uri`: relative/absolute,
trailing slash, ``./``/``..``, symlinks, ``s3://b//k``, ``file://`` are one input), and a run
against another input into the same output is refused.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

from pydantic import field_validator, model_validator

from phantom_ray import storage
from phantom_ray.config import Config
from phantom_ray.infer.api import SamplingParams
from phantom_ray.infer.api import Generation
from phantom_ray.infer.torch_engine import error_detail
from phantom_ray.loader import is_preset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".parquet", ".jsonl", ".ndjson", ".csv")
MANIFEST_COLUMNS = ("image_uri", "uri", "image", "path", "url", "file")
FORMATS = ("parquet", "jsonl")
JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
PLAN_DIR = "_plan"
PLAN_FILE = "_plan.json"
METADATA_KEY = b"phantom_ray.caption"
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024  # eval's decode stage (below); captioning uses the ingest limits
DECODE_MEMORY_BYTES = 512 * 1024 * 1024  # reserved per decode task (an 8K x 8K RGB image is 200 MB decoded)
DEFAULT_PROMPT = "Describe the image in detail."
# hidden plan columns: the canonical URI the worker reads (a manifest's own column stays as written)
URI_COLUMN = "__phantom_uri"
ADDED_COLUMNS = ("caption", "prompt", "prompt_tokens", "generated_tokens", "finish_reason", "latency_s",
                 "error", "error_detail")


class CaptionConfig(Config):
    """Everything a captioning run needs; the CLI flags map 1:1 onto these fields. ``input`` and
    ``output`` are canonicalised (and a local ``model`` path made absolute) once, here, on the
    driver, before anything reaches Ray."""

    input: str
    output: str
    model: str
    prompt: str = DEFAULT_PROMPT
    prompt_column: str | None = None     # manifest column holding each row's prompt
    image_column: str | None = None      # manifest column holding the image URI (default: detected)
    sampling: SamplingParams = SamplingParams(max_tokens=128)
    engine: Literal["auto", "torch", "vllm"] = "auto"
    batch_size: int = 8                  # images per generate call
    min_replicas: int = 1                # autoscaling actor pool bounds
    max_replicas: int = 1
    num_gpus: float | None = None        # per replica; fractional shares a GPU; None: 1 if the cluster has GPUs
    num_cpus: float = 1.0                # per replica
    io_threads: int = 8                  # per replica: threads fetching and opening images ahead of the model
    format: Literal["parquet", "jsonl"] = "parquet"
    shard_size: int = 1000               # rows per chunk = per output shard
    list_page_size: int = 1000           # keys per S3 listing request
    max_pixels: int | None = None        # None: the ingest default (phantom_ray.ingest.ImageLimits)
    max_image_bytes: int | None = None   # None: the ingest default
    dtype: str = "auto"                  # auto: bfloat16 on GPU, float32 on CPU
    attn_implementation: str = "sdpa"
    seed: int = 0                        # preset weights
    max_length: int = 4096
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, what in (("input", "give a prefix/directory of images or a manifest (parquet/JSONL/CSV)"),
                           ("output", "give a local directory or s3://bucket/prefix for the caption shards"),
                           ("model", "give a preset name, a checkpoint directory or an s3:// checkpoint")):
            if not data.get(name):
                raise ValueError(f"{name}: {what}")
        data["input"] = storage.canonical_uri(data["input"])
        data["output"] = storage.canonical_uri(data["output"])
        model = str(data["model"])
        if "://" not in model and (os.path.exists(model) or model.startswith((".", "/", "~"))):
            from phantom_ray.config import resolve_path

            data["model"] = resolve_path(model)  # a local checkpoint; presets and hub ids stay names
        if isinstance(data.get("sampling"), dict):
            data["sampling"] = SamplingParams(**data["sampling"])
        return data

    @field_validator("batch_size", "shard_size", "min_replicas", "max_replicas", "io_threads", "list_page_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("num_cpus")
    @classmethod
    def _cpus(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("num_gpus")
    @classmethod
    def _gpus(cls, v: float | None) -> float | None:
        if v is not None and v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _replicas(self) -> "CaptionConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.engine == "vllm" and self.sampling.num_beams > 1:  # refused before Ray starts
            from phantom_ray.infer.backends import resolve_backend

            resolve_backend(self.engine, self.sampling.num_beams, "caption")
        return self

    def job_record(self) -> dict[str, Any]:
        """What must match for a re-run to extend an existing output (recorded in ``_job.json``)."""
        return {"input": self.input, "model": self.model, "prompt": self.prompt,
                "prompt_column": self.prompt_column, "image_column": self.image_column,
                "sampling": self.sampling.to_dict(), "format": self.format, "shard_size": self.shard_size}


# ---- listing and the chunk plan ----------------------------------------------------------------

def is_manifest(uri: str) -> bool:
    return str(uri).lower().endswith(MANIFEST_EXTENSIONS)


def iter_images(uri: str, page_size: int = 1000) -> Iterator[str]:
    """Canonical image URIs under a prefix/directory (by extension) or a single image, streamed."""
    return storage.iter_files(uri, suffixes=tuple(e for x in IMAGE_EXTENSIONS for e in (x, x.upper())),
                              page_size=page_size)


def _open_stream(uri: str):
    """A binary file object over a local file or an S3 object, read as it streams."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        client = storage.s3_client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"]
        except client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"no such manifest: {uri}") from exc
    return open(uri, "rb")


def _manifest_batches(uri: str, batch_rows: int) -> Iterator[list[dict]]:
    """Rows of a manifest, ``batch_rows`` at a time, never the whole file in memory."""
    low = uri.lower()
    if low.endswith(".parquet"):
        import pyarrow.parquet as pq

        fs, path = storage.pyarrow_fs(uri)
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no such manifest: {uri}") from exc
        for batch in pf.iter_batches(batch_size=batch_rows):
            yield batch.to_pylist()
        return
    stream = _open_stream(uri)
    text = io.TextIOWrapper(stream, encoding="utf-8", newline="" if low.endswith(".csv") else None)
    rows: list[dict] = []
    if low.endswith(".csv"):
        reader = csv.DictReader(text)
        for rec in reader:  # every CSV value is a string: carried through as the string it was
            rows.append(dict(rec))
            if len(rows) == batch_rows:
                yield rows
                rows = []
    else:
        for n, line in enumerate(text, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"manifest {uri} line {n}: not JSON ({exc})") from exc
            if isinstance(rec, str):
                rec = {"image_uri": rec}
            if not isinstance(rec, dict):
                raise ValueError(f"manifest {uri} line {n}: expected an object or a string, got {type(rec).__name__}")
            rows.append(rec)
            if len(rows) == batch_rows:
                yield rows
                rows = []
    if rows:
        yield rows


def _manifest_base(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(uri)


def _resolve_image(value: Any, base: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: image URI must be a non-empty string, got {value!r}")
    if storage.is_s3(value) or value.lower().startswith("file:") or os.path.isabs(value):
        return storage.canonical_uri(value)
    if storage.is_s3(base):
        return storage.canonical_uri(f"{base}/{value}")
    return storage.canonical_uri(value, base=base)


def iter_plan_rows(cfg: CaptionConfig, batch_rows: int) -> Iterator[list[dict]]:
    """The input as batches of plan rows, in a deterministic order: a listing gives
    ``{"image_uri", URI_COLUMN}``; a manifest gives its own columns plus ``URI_COLUMN``."""
    uri = cfg.input
    if not is_manifest(uri):
        rows: list[dict] = []
        for u in iter_images(uri, cfg.list_page_size):
            rows.append({"image_uri": u, URI_COLUMN: u})
            if len(rows) == batch_rows:
                yield rows
                rows = []
        if rows:
            yield rows
        return
    base = _manifest_base(uri)
    col = cfg.image_column
    offset = 0
    for rows in _manifest_batches(uri, batch_rows):
        if col is None:
            col = next((c for c in MANIFEST_COLUMNS if c in rows[0]), None)
            if col is None:
                raise ValueError(f"manifest {uri}: no image column; expected one of {', '.join(MANIFEST_COLUMNS)} "
                                 f"or --image-column (columns: {', '.join(rows[0])})")
        if offset == 0:
            clash = [c for c in rows[0] if c in ADDED_COLUMNS and not (c == "prompt" and cfg.prompt_column == "prompt")]
            if clash:
                raise ValueError(f"manifest {uri}: column(s) {', '.join(clash)} would be overwritten by the "
                                 "caption output; rename them in the manifest")
            if cfg.prompt_column and cfg.prompt_column not in rows[0]:
                raise ValueError(f"manifest {uri}: no column {cfg.prompt_column!r} for --prompt-column "
                                 f"(columns: {', '.join(rows[0])})")
        for n, r in enumerate(rows):
            if col not in r:
                raise ValueError(f"manifest {uri} row {offset + n}: no {col!r} field")
            r[URI_COLUMN] = _resolve_image(r[col], base, f"manifest {uri} row {offset + n} column {col!r}")
        offset += len(rows)
        yield rows


def chunk_uri(output: str, i: int) -> str:
    return storage.join(output, PLAN_DIR, f"chunk-{i:08d}.parquet")


def shard_name(i: int, fmt: str) -> str:
    return f"part-{i:08d}.{fmt}"


def _table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


def _parquet_bytes(table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def make_plan(cfg: CaptionConfig) -> dict[str, Any]:
    """The chunk plan of ``cfg.output``: read if complete, else written now by streaming the input
    (one chunk in memory at a time). Chunk i is rows [i * shard_size, (i + 1) * shard_size) of the
    listing/manifest order, so a rerun that has to plan again (the driver died mid-plan) writes the
    very same chunks."""
    plan_uri = storage.join(cfg.output, PLAN_DIR, PLAN_FILE)
    if storage.exists(plan_uri):
        plan = json.loads(storage.read_text(plan_uri))
        if plan.get("input") != cfg.input or plan.get("shard_size") != cfg.shard_size:
            raise ValueError(f"{plan_uri} was planned for input {plan.get('input')} with shard size "
                             f"{plan.get('shard_size')}; this run asks for {cfg.input} with {cfg.shard_size}")
        return plan
    chunks = rows = 0
    # chunk files are written by a few threads (an S3 PUT each), at most 2 x threads chunks in flight,
    # so listing and writing overlap and the driver holds a bounded number of chunks
    inflight: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="caption-plan") as pool:
        for batch in iter_plan_rows(cfg, cfg.shard_size):
            inflight.append(pool.submit(storage.write_bytes_atomic, chunk_uri(cfg.output, chunks),
                                        _parquet_bytes(_table(batch))))
            chunks += 1
            rows += len(batch)
            while len(inflight) > 8:
                inflight.popleft().result()
        while inflight:
            inflight.popleft().result()
    if rows == 0:
        raise FileNotFoundError(f"no images under {cfg.input} (extensions {', '.join(IMAGE_EXTENSIONS)}) "
                                f"and not a manifest ({', '.join(MANIFEST_EXTENSIONS)})")
    plan = {"input": cfg.input, "kind": "manifest" if is_manifest(cfg.input) else "listing",
            "shard_size": cfg.shard_size, "chunks": chunks, "rows": rows,
            "chunk_files": f"{PLAN_DIR}/chunk-<i:08d>.parquet", "shards": "part-<i:08d>.<format>"}
    storage.write_text_atomic(plan_uri, json.dumps(plan, indent=2) + "\n")
    return plan


# ---- outputs -----------------------------------------------------------------------------------

def _added_arrays(n: int):
    return {c: [None] * n for c in ADDED_COLUMNS}


def _output_table(plan_table, added: dict[str, list], job: dict):
    import pyarrow as pa

    table = plan_table.drop_columns([URI_COLUMN])
    types = {"caption": pa.string(), "prompt": pa.string(), "prompt_tokens": pa.int32(),
             "generated_tokens": pa.int32(), "finish_reason": pa.string(), "latency_s": pa.float32(),
             "error": pa.string(), "error_detail": pa.string()}
    for c in ADDED_COLUMNS:
        if c in table.column_names:  # --prompt-column prompt: the manifest's own column is the prompt
            continue
        table = table.append_column(pa.field(c, types[c]), pa.array(added[c], type=types[c]))
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(job, sort_keys=True).encode()
    return table.replace_schema_metadata(meta)


def _encode_shard(table, fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in table.to_pylist()).encode()
    return _parquet_bytes(table)


def read_shard(uri: str, columns: list[str] | None = None) -> list[dict]:
    data = storage.read_bytes(uri)
    if uri.endswith(".jsonl"):
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        return [{c: r.get(c) for c in columns} for r in rows] if columns else rows
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data), columns=columns).to_pylist()


def output_shards(output: str, fmt: str | None = None) -> list[str]:
    """The output shards under ``output`` (listed page by page, top level only)."""
    suffixes = (f".{fmt}",) if fmt else tuple(f".{f}" for f in FORMATS)
    out = []
    for u in storage.iter_files(output, suffixes=suffixes):
        rel = u[len(storage.canonical_uri(output)):].lstrip("/")
        if "/" not in rel and rel.startswith("part-"):
            out.append(u)
    return out


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
        if theirs.get("input") != mine["input"]:
            raise ValueError(
                f"{cfg.output} holds captions of another input: {theirs.get('input')} (this run: {mine['input']}); "
                "use a new --output for a different input")
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        if diff:
            raise ValueError(
                f"{cfg.output} holds captions made with other settings ({', '.join(diff)} differ: "
                f"{ {k: theirs.get(k) for k in diff} } vs { {k: mine[k] for k in diff} }); "
                "use a new --output or the same settings to resume")
        return
    storage.write_text_atomic(uri, json.dumps(mine, indent=2) + "\n")


# ---- the model stage ---------------------------------------------------------------------------

def _fetch_and_open(uri: str, limits):
    """One row's image: read its bytes (local path or ``s3://``) and open them with the one
    image-ingest function (``phantom_ray.ingest.open_image``: byte, pixel, aspect and format limits).
    Raises ``phantom_ray.ingest.InputError`` (``FetchError`` / ``ImageError``) with a reason code."""
    from phantom_ray.ingest import FetchError, open_image

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        raise FetchError("not_found", f"cannot read {uri}: {exc}") from None
    except OSError as exc:  # PermissionError, a directory, network
        raise FetchError("fetch_failed", f"cannot read {uri}: {exc}") from None
    return open_image(data, limits, what=uri)


def load_caption_engine(model_id: str, backend: str, *, num_gpus: float, dtype: str, seed: int, max_length: int,
                        attn_implementation: str, batch_size: int):
    """The engine of one model replica: ``load_engine(model, backend=...)`` on this replica's device."""
    from phantom_ray.infer.api import load_engine
    from phantom_ray.loader import default_device

    return load_engine(model_id, backend=backend, device=default_device(num_gpus), dtype=dtype, seed=seed,
                       max_length=max_length, attn_implementation=attn_implementation, max_batch_size=batch_size)


def _shard_counts(table) -> dict[str, Any]:
    import pyarrow.compute as pc

    errors = collections.Counter(e for e in table.column("error").to_pylist() if e)
    return {"rows": table.num_rows, "errors": json.dumps(dict(errors)),
            "prompt_tokens": int(pc.sum(table.column("prompt_tokens")).as_py() or 0),
            "generated_tokens": int(pc.sum(table.column("generated_tokens")).as_py() or 0)}


class ChunkCaptioner:
    """map_batches callable class on the autoscaling actor pool: holds one engine; per chunk id it
    reads the chunk's plan rows, captions them and writes the chunk's shard itself. Returns counts
    only, so nothing but a few integers per chunk travels back to the driver."""

    def __init__(self, job: dict, num_gpus: float = 0.0, torch_threads: int | None = None):
        import warnings

        from phantom_ray.ingest import DEFAULT_LIMITS, ImageLimits

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.job = job
        self.sampling = SamplingParams(**{**job["sampling"], "stop": tuple(job["sampling"].get("stop", ()))})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the driver already warned about preset weights
            self.engine = load_caption_engine(job["model"], job["engine"], num_gpus=num_gpus, dtype=job["dtype"],
                                              seed=job["seed"], max_length=job["max_length"],
                                              attn_implementation=job["attn_implementation"],
                                              batch_size=job["batch_size"])
        self.limits = ImageLimits(max_bytes=job["max_image_bytes"] or DEFAULT_LIMITS.max_bytes,
                                  max_pixels=job["max_pixels"] or DEFAULT_LIMITS.max_pixels)
        self.pool = ThreadPoolExecutor(max(1, job["io_threads"]), thread_name_prefix="caption-io")

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = collections.defaultdict(list)
        for i in batch["chunk"]:
            t0 = time.perf_counter()
            counts = self.caption_chunk(int(i))
            out["chunk"].append(int(i))
            out["busy_s"].append(time.perf_counter() - t0)
            for k, v in counts.items():
                out[k].append(v)
        return dict(out)

    def caption_chunk(self, i: int) -> dict[str, Any]:
        import pyarrow.parquet as pq

        job = self.job
        shard = storage.join(job["output"], shard_name(i, job["format"]))
        if storage.exists(shard):
            # a retried task whose first attempt wrote the shard before its actor died: same rows
            if job["format"] == "parquet":
                table = pq.read_table(io.BytesIO(storage.read_bytes(shard)))
            else:
                table = _table(read_shard(shard))
            return {**_shard_counts(table), "written": False}
        plan = pq.read_table(io.BytesIO(storage.read_bytes(chunk_uri(job["output"], i))))
        uris = plan.column(URI_COLUMN).to_pylist()
        n = len(uris)
        pcol = job["prompt_column"]
        prompts = plan.column(pcol).to_pylist() if pcol else [job["prompt"]] * n
        added = _added_arrays(n)
        added["prompt"] = [p if isinstance(p, str) else None for p in prompts]
        bs = job["batch_size"]

        def load(j: int):
            return _fetch_and_open(uris[j], self.limits)

        # images are fetched and opened on I/O threads, up to two batches ahead of the model
        futures: dict[int, Any] = {}
        submitted = 0

        def submit_upto(k: int) -> int:
            for j in range(submitted, min(n, k)):
                futures[j] = self.pool.submit(load, j)
            return max(submitted, min(n, k))

        submitted = submit_upto(3 * bs)
        from phantom_ray.infer.api import Request
        from phantom_ray.ingest import InputError

        for start in range(0, n, bs):
            idx, reqs = [], []
            for j in range(start, min(n, start + bs)):
                fut = futures.pop(j)
                prompt = added["prompt"][j]
                try:
                    img = fut.result()
                except InputError as exc:
                    added["error"][j], added["error_detail"][j] = exc.reason, exc.detail
                    continue
                if not prompt:
                    added["error"][j] = "missing_prompt"
                    added["error_detail"][j] = f"row {j} of chunk {i}: column {pcol!r} is empty or not text"
                    continue
                idx.append(j)
                reqs.append(Request.user(prompt, images=[img], params=self.sampling, key=uris[j]))
            submitted = submit_upto(start + 4 * bs)
            if reqs:
                for j, g in zip(idx, self.engine.generate(reqs)):
                    added["caption"][j] = g.text.strip() if g.text is not None else None  # the answer, unpadded
                    added["prompt_tokens"][j] = g.prompt_tokens
                    added["generated_tokens"][j] = g.completion_tokens
                    added["finish_reason"][j] = g.finish_reason
                    added["latency_s"][j] = g.latency_s
                    added["error"][j], added["error_detail"][j] = g.error, g.error_detail
        for j in range(n):
            if added["error"][j] is not None:
                added["caption"][j] = None
            for c in ("prompt_tokens", "generated_tokens"):
                if added[c][j] is None:
                    added[c][j] = 0
        table = _output_table(plan, added, job["record"])
        storage.write_bytes_atomic(shard, _encode_shard(table, job["format"]))
        return {**_shard_counts(table), "written": True}


# ---- the captioning job ------------------------------------------------------------------------

class _Progress:
    """Images captioned so far, images/s and errors so far, through the one progress helper
    (``phantom_ray.logs.progress``: a live bar on a terminal, a plain line every 10 s otherwise)."""

    def __init__(self, total: int, enabled: bool):
        from phantom_ray.logs import progress

        self.errors = 0
        self.bar = progress(total, "captioning", unit="img", interval=10.0) if enabled and total else None

    def update(self, images: int, errors: int) -> None:
        self.errors += errors
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.errors} errors", refresh=False)
            self.bar.update(images)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def caption(cfg: CaptionConfig, on_chunk: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Caption every row of ``cfg.input`` not yet in ``cfg.output``; returns (and writes) the summary.
    ``on_chunk(i)`` is called on the driver as each chunk's counts come back."""
    import ray
    from ray.data import ActorPoolStrategy

    # the backend that runs (and is recorded): auto is vllm where installed, else torch; beam search is
    # torch-only. Resolved first, so a refused combination fails before any planning
    from phantom_ray.infer.backends import resolve_backend

    engine = resolve_backend(cfg.engine, cfg.sampling.num_beams, "caption")
    t0 = time.perf_counter()
    if is_preset(cfg.model):
        log.warning("model %r is a preset name: randomly initialised weights (seed %d); captions are noise",
                    cfg.model, cfg.seed)
    _check_job(cfg)
    plan = make_plan(cfg)
    t_plan = time.perf_counter() - t0
    done_names = {storage.basename(u) for u in output_shards(cfg.output, cfg.format)}
    pending = [i for i in range(plan["chunks"]) if shard_name(i, cfg.format) not in done_names]
    done_chunks = plan["chunks"] - len(pending)
    # rows already captioned: every chunk but the last holds shard_size rows
    last = plan["chunks"] - 1
    already = sum(plan["rows"] - last * cfg.shard_size if i == last else cfg.shard_size
                  for i in range(plan["chunks"]) if shard_name(i, cfg.format) in done_names)
    log.info("%d rows in %d chunks: %d chunks already captioned, %d to do", plan["rows"], plan["chunks"],
             done_chunks, len(pending))
    errors: collections.Counter = collections.Counter()
    processed = prompt_tokens = generated_tokens = written = 0
    busy = 0.0
    t_first = None
    if pending:
        _ensure_ray()
        num_gpus = resolve_num_gpus(cfg.num_gpus)
        job = {"output": cfg.output, "format": cfg.format, "model": cfg.model, "engine": engine,
               "dtype": cfg.dtype, "seed": cfg.seed, "max_length": cfg.max_length,
               "attn_implementation": cfg.attn_implementation, "io_threads": cfg.io_threads,
               "sampling": cfg.sampling.to_dict(), "prompt": cfg.prompt, "prompt_column": cfg.prompt_column,
               "batch_size": cfg.batch_size, "max_image_bytes": cfg.max_image_bytes, "max_pixels": cfg.max_pixels,
               "record": {**cfg.job_record(), "engine": engine}}
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images, not blocks
        ds = ray.data.from_items([{"chunk": i} for i in pending], override_num_blocks=len(pending))
        # one torch thread per CPU the replica reserves, so replicas sharing a node do not oversubscribe it
        threads = max(1, int(cfg.num_cpus)) if num_gpus == 0 else None
        ds = ds.map_batches(
            ChunkCaptioner, batch_size=1, compute=ActorPoolStrategy(min_size=cfg.min_replicas, max_size=cfg.max_replicas),
            num_gpus=num_gpus, num_cpus=cfg.num_cpus,
            fn_constructor_kwargs={"job": job, "num_gpus": num_gpus, "torch_threads": threads},
            runtime_env=storage.storage_runtime_env())  # S3 settings reach the actors through Ray
        todo_rows = plan["rows"] - already
        bar = _Progress(todo_rows, cfg.progress)
        try:
            for r in ds.iter_rows():
                if t_first is None:
                    t_first = time.perf_counter()
                errs = json.loads(r["errors"])
                errors.update(errs)
                processed += int(r["rows"])
                prompt_tokens += int(r["prompt_tokens"])
                generated_tokens += int(r["generated_tokens"])
                written += 1
                busy += float(r["busy_s"])
                bar.update(int(r["rows"]), sum(errs.values()))
                if on_chunk is not None:
                    on_chunk(int(r["chunk"]))
        finally:
            bar.close()
    wall = time.perf_counter() - t0
    startup = (t_first - t0) if t_first is not None else wall
    steady = wall - startup
    first_rows = min(cfg.shard_size, processed) if t_first is not None else 0
    summary = {
        "input": cfg.input, "output": cfg.output, "model": cfg.model, "engine": engine, "prompt": cfg.prompt,
        "prompt_column": cfg.prompt_column, "sampling": cfg.sampling.to_dict(), "format": cfg.format,
        "images": plan["rows"], "chunks": plan["chunks"], "images_already_done": already,
        "images_processed": processed, "captioned": processed - sum(errors.values()),
        "errors": sum(errors.values()), "errors_by_reason": dict(sorted(errors.items())),
        "shards_written": written, "shards_total": done_chunks + written,
        "prompt_tokens": prompt_tokens, "generated_tokens": generated_tokens,
        "tokens_per_s": generated_tokens / wall if wall > 0 else 0.0,
        "images_per_s": processed / wall if wall > 0 else 0.0,
        # start-up: plan, Ray Data and actor start, model load, up to the first finished chunk;
        # steady state: from there to the end (rows of the chunks after the first)
        "wall_s": wall, "plan_s": t_plan, "startup_s": startup, "steady_s": steady,
        "steady_images_per_s": (processed - first_rows) / steady if steady > 0 else None,
        # time the replicas spent on chunks (fetch, open, generate, write), summed over replicas
        "replica_busy_s": busy, "images_per_replica_busy_s": processed / busy if busy > 0 else None,
        "replicas": [cfg.min_replicas, cfg.max_replicas], "batch_size": cfg.batch_size,
    }
    storage.write_text_atomic(storage.join(cfg.output, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    errs = ", ".join(f"{k}={v}" for k, v in s["errors_by_reason"].items()) or "none"
    return (f"{s['images']} images ({s['images_already_done']} already captioned, {s['images_processed']} now): "
            f"{s['captioned']} captions, {s['errors']} errors ({errs}); {s['generated_tokens']} tokens, "
            f"{s['images_per_s']:.2f} images/s end to end (start-up {s['startup_s']:.1f}s, steady "
            f"{s['steady_s']:.1f}s), wall {s['wall_s']:.1f}s; {s['shards_written']} shards written to {s['output']}")


# ================================================================================================
# The decode-task + generation-actor stages of eval's make_predict_fn (phantom_ray.eval.predict).
# Captioning above no longer uses them: its model stage gets image bytes and opens them itself.
# ================================================================================================


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


def decode_batch(batch, model_id: str, max_length: int, max_pixels: int | None, max_image_bytes: int):
    """Rows (key, shard, uri | image bytes, prompt, max_new_tokens) -> tokenized prompts and
    float32 pixel values; a bad image or prompt becomes a row with ``error`` set."""
    import pyarrow as pa

    from phantom_ray.data.schema import encode_pixels
    from phantom_ray.processing import ProcessingError

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
            # float32 pixels: eval compares with an in-process run, which never rounds them
            rec["pixel_values"], rec["pixel_shape"] = encode_pixels(sample.pixel_values, "float32")
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
                 num_gpus: float = 0.0, torch_threads: int | None = None):
        import warnings

        import torch

        from phantom_ray.infer.api import load_engine
        from phantom_ray.loader import default_device

        if torch_threads:
            torch.set_num_threads(torch_threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the driver already warned about preset weights
            self.engine = load_engine(model_id, backend="torch", device=default_device(num_gpus), dtype=dtype,
                                      attn_implementation=attn_implementation, seed=seed, max_length=max_length)
        self.generation = SamplingParams(**generation)
        self.batch_size = batch_size

    def __call__(self, batch):
        import pyarrow as pa

        from phantom_ray.data.schema import row_to_sample

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
                samples.append(row_to_sample(r["input_ids"], None, r["pixel_values"], r["pixel_shape"],
                                             [r["num_tiles"]] if r["pixel_values"] is not None else [], "float32"))
            gens = self.engine.generate_samples(samples, self.generation.replace(max_tokens=max_new),
                                                [rows[i]["key"] for i in idx], batch_size=self.batch_size)
            for i, g in zip(idx, gens):
                results[i] = g
        # a caption is the answer without surrounding whitespace
        out = [{"key": r["key"], "shard": r["shard"], "caption": g.text.strip() if g.text is not None else None,
                "num_tiles": g.num_tiles, "tokens_generated": g.completion_tokens, "finish_reason": g.finish_reason, "error": g.error,
                "error_detail": g.error_detail} for r, g in zip(rows, results)]
        return pa.Table.from_pylist(out, schema=_caption_schema())


class VLLMCaptioner:
    """map_batches callable class for the ``vllm`` engine: vLLM preprocesses images itself (the same
    tiling as our processor), so its actors take the raw rows (image bytes or URI + prompt) instead of
    the decode stage's pixel values, and generate each batch in one ``vllm.LLM`` call."""

    def __init__(self, model_id: str, generation: dict, batch_size: int, dtype: str = "auto", seed: int = 0,
                 max_length: int = 4096, max_pixels: int | None = None,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, num_gpus: float = 0.0):
        import warnings

        from phantom_ray.infer.api import load_engine
        from phantom_ray.loader import default_device

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the driver already warned about preset weights
            self.engine = load_engine(model_id, backend="vllm", device=default_device(num_gpus), dtype=dtype,
                                      seed=seed, max_length=max_length, max_pixels=max_pixels,
                                      max_batch_size=batch_size)
        self.generation = SamplingParams(**{**generation, "stop": tuple(generation.get("stop", ()))})
        self.max_image_bytes = max_image_bytes

    def __call__(self, batch):
        import pyarrow as pa

        from phantom_ray.infer.api import Request
        from phantom_ray.processing import ProcessingError

        rows = batch.to_pylist()
        results: list[Generation | None] = [None] * len(rows)
        reqs, idx = [], []
        for i, r in enumerate(rows):
            try:
                data = _read_image(r, self.max_image_bytes)
            except ProcessingError as exc:
                results[i] = Generation(text=None, error=exc.reason, error_detail=error_detail(exc))
                continue
            params = self.generation.replace(max_tokens=r.get("max_new_tokens") or self.generation.max_tokens)
            reqs.append(Request.user(r["prompt"], images=[data] if data is not None else [], params=params,
                                     key=r["key"]))
            idx.append(i)
        for i, g in zip(idx, self.engine.generate(reqs)):
            results[i] = g
        out = [{"key": r["key"], "shard": r.get("shard"), "caption": g.text.strip() if g.text is not None else None,
                "num_tiles": g.num_tiles, "tokens_generated": g.completion_tokens, "finish_reason": g.finish_reason,
                "error": g.error, "error_detail": g.error_detail} for r, g in zip(rows, results)]
        return pa.Table.from_pylist(out, schema=_caption_schema())


@dataclass
class StageOptions:
    """Resources and settings of the two Ray Data stages (shared by captioning and eval)."""

    model: str
    generation: SamplingParams
    engine: str = "torch"                # resolved backend ("torch" | "vllm"), not "auto"
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

        init_ray(address=address, log_to_driver=False)
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
    runtime_env = storage.storage_runtime_env()  # S3 settings reach tasks and actors through Ray
    blocks = max(1, min(len(rows), math.ceil(len(rows) / opts.batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows its own
    if opts.engine == "vllm":  # one stage: vLLM opens and tiles the images in its actors
        return ds.map_batches(
            VLLMCaptioner, batch_format="pyarrow", batch_size=opts.batch_size,
            compute=ActorPoolStrategy(min_size=opts.min_replicas, max_size=opts.max_replicas),
            num_gpus=num_gpus, num_cpus=opts.num_cpus,
            fn_constructor_kwargs={"model_id": opts.model, "generation": opts.generation.to_dict(),
                                   "batch_size": opts.batch_size, "dtype": opts.dtype, "seed": opts.seed,
                                   "max_length": opts.max_length, "max_pixels": opts.max_pixels,
                                   "max_image_bytes": opts.max_image_bytes, "num_gpus": num_gpus},
            runtime_env=runtime_env)
    if opts.engine != "torch":
        raise ValueError(f"StageOptions.engine must be torch or vllm (resolved), got {opts.engine!r}")
    # Decoding must not run inside (and hold) a GPU replica. Ray Data fuses consecutive maps whose
    # remote args are equal; the decode tasks' memory reservation (full-size images are decoded
    # there) differs from the actors' args, so the stages stay apart.
    ds = ds.map_batches(
        decode_batch, batch_format="pyarrow", batch_size=opts.batch_size, num_cpus=opts.decode_num_cpus,
        memory=DECODE_MEMORY_BYTES, concurrency=opts.decode_concurrency,
        fn_kwargs={"model_id": opts.model, "max_length": opts.max_length, "max_pixels": opts.max_pixels,
                   "max_image_bytes": opts.max_image_bytes}, runtime_env=runtime_env)
    # one torch thread per CPU the replica reserves, so replicas sharing a node do not oversubscribe it
    threads = max(1, int(opts.num_cpus)) if num_gpus == 0 else None
    return ds.map_batches(
        Captioner, batch_format="pyarrow", batch_size=opts.batch_size,
        compute=ActorPoolStrategy(min_size=opts.min_replicas, max_size=opts.max_replicas),
        num_gpus=num_gpus, num_cpus=opts.num_cpus,
        fn_constructor_kwargs={"model_id": opts.model, "generation": opts.generation.to_dict(),
                               "batch_size": opts.batch_size, "dtype": opts.dtype,
                               "attn_implementation": opts.attn_implementation, "seed": opts.seed,
                               "max_length": opts.max_length, "num_gpus": num_gpus, "torch_threads": threads},
        runtime_env=runtime_env)


__all__ = ["CaptionConfig", "caption", "make_plan", "iter_plan_rows", "read_outputs", "output_shards", "read_shard",
           "format_summary", "ChunkCaptioner", "load_caption_engine", "IMAGE_EXTENSIONS", "ADDED_COLUMNS",
           "DEFAULT_PROMPT", "build_generation_dataset", "StageOptions", "Captioner", "decode_batch", "load_processor"]
