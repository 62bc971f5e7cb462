"""The input side and the storage layout of a captioning output: listing a prefix or streaming a
manifest, cutting it into the fixed chunk plan (``_plan/``), and naming and reading output shards.

Chunk i is rows [i * shard_size, (i + 1) * shard_size) of the listing/manifest order; the plan is
written once (``_plan/chunk-<i>.parquet``, then ``_plan/_plan.json``) and reused by every rerun.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

from phantom_ray import storage
from phantom_ray.caption.config import ADDED_COLUMNS, FORMATS, CaptionConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".parquet", ".jsonl", ".ndjson", ".csv")
MANIFEST_COLUMNS = ("image_uri", "uri", "image", "path", "url", "file")
PLAN_DIR = "_plan"
PLAN_FILE = "_plan.json"
# hidden plan column: the canonical URI the worker reads (a manifest's own column stays as written)
URI_COLUMN = "__phantom_uri"


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
    base = storage.parent(uri)
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


def table_from_rows(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


def parquet_bytes(table) -> bytes:
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
                                        parquet_bytes(table_from_rows(batch))))
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



# ---- output shards -----------------------------------------------------------------------------

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



__all__ = ["IMAGE_EXTENSIONS", "MANIFEST_EXTENSIONS", "MANIFEST_COLUMNS", "PLAN_DIR", "PLAN_FILE", "URI_COLUMN",
           "is_manifest", "iter_images", "iter_plan_rows", "chunk_uri", "shard_name", "table_from_rows",
           "parquet_bytes", "make_plan", "read_shard", "output_shards", "read_outputs"]
