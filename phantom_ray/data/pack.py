"""``phantom-ray data pack``: corpora in any input layout -> a few large self-describing parquet shards.

Output (local path or ``s3://``)::

    <output>/shards/<source>-<chunk>-<part>.parquet   rows in the packed schema (phantom_ray.data.schema)
    <output>/errors.parquet                           sample_id, source, index, reason, detail
    <output>/manifest.json                            rows, bytes, errors and shard list per source
    <output>/_state/plan.json, _state/chunks/*.json   resume bookkeeping

How it works: the driver reads the (small) annotation files, estimates bytes per row and splits
every input file into chunks of about one shard each (the plan, saved once). Each chunk is one
Ray task: it fetches and fully decodes every image (a thread pool overlaps S3 latency), writes its
shard(s) atomically (temp file + rename locally, one PUT on S3) and then a chunk marker holding
its shard list and error rows. A re-run reuses the saved plan and skips chunks with a marker; a
killed run leaves at most shards whose marker is missing, which the re-run rewrites identically
(shard names and contents depend only on the input and the plan). The manifest is written last,
so its presence means the pack is complete.

    phantom-ray data pack --input s3://corpora/sharegpt4v/sharegpt4v_mix665k.json --layout llava \\
        --image-root s3://corpora/sharegpt4v --output s3://packed/sharegpt4v --shard-size-mb 256
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from phantom_ray import storage
from phantom_ray.data import readers
from phantom_ray.data.schema import (ERRORS_SCHEMA, PACKED_SCHEMA, RawRecord, RowError, check_image,
                                     row_error_from_fetch)
from phantom_ray.ingest import FetchError, FetchPolicy, fetch_bytes, resolve_source

log = logging.getLogger(__name__)

PLAN_VERSION = 1
MANIFEST_FORMAT = "phantom-ray-pack/1"


@dataclass(frozen=True)
class ChunkSpec:
    chunk_id: str        # "<source>-<nnnnn>", prefix of its shard names
    file_uri: str
    source: str
    file_key: str
    start: int
    stop: int


@dataclass(frozen=True)
class PackJob:
    """Everything a chunk task needs besides its records (small; shipped to every task)."""

    layout: str
    output: str
    image_root: str
    target_bytes: int
    io_threads: int = 8


def _state(output: str, *parts: str) -> str:
    return storage.join(output, "_state", *parts)


def _image_policy(image_root: str) -> FetchPolicy:
    """Record image paths resolve inside the image root (local dir or s3:// prefix), nowhere else."""
    return FetchPolicy(root=image_root, allow_data=False)


def _resolve_image(image_root: str, path: str) -> str:
    """The image's location under the root; FetchError when it lies outside."""
    return resolve_source(path, _image_policy(image_root))


def _fetch(job: PackJob, rec: RawRecord) -> RawRecord:
    """Fetch and check the record's image (sets ``rec.error`` instead of raising: one bad image is
    an error row, never the end of the pack)."""
    if rec.error is not None or (rec.image_bytes is None and rec.image_path is None):
        return rec
    try:
        if rec.image_bytes is None:
            try:
                rec.image_bytes = fetch_bytes(rec.image_path, _image_policy(job.image_root))
            except FetchError as exc:
                raise row_error_from_fetch(exc) from None
        check_image(rec.image_bytes)
    except RowError as exc:
        rec.error = exc
    return rec


def _row(rec: RawRecord) -> dict:
    import hashlib

    img = rec.image_bytes
    return {
        "sample_id": rec.sample_id, "source": rec.source, "kind": rec.kind,
        "conversations": json.dumps(rec.conversations, ensure_ascii=False),
        "chosen": rec.chosen, "rejected": rec.rejected, "image": img,
        "image_sha256": hashlib.sha256(img).hexdigest() if img is not None else None,
        "orig_id": rec.orig_id,
    }


def _row_bytes(row: dict) -> int:
    return len(row["image"] or b"") + len(row["conversations"]) + len(row["chosen"] or "") + len(row["rejected"] or "")


def _write_shard(uri: str, rows: list[dict]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if storage.exists(uri):  # written by an earlier, killed run of the same plan: identical content
        return storage.size(uri)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=PACKED_SCHEMA), sink, compression="zstd",
                   row_group_size=512)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes_atomic(uri, data)
    return len(data)


def pack_chunk(job: PackJob, spec: ChunkSpec, raw: list | None) -> dict:
    """Pack one chunk; ``raw`` is its slice of JSON records (None for parquet, read here)."""
    f = readers.InputFile(spec.file_uri, spec.source, spec.file_key)
    if raw is None:
        raw = readers.read_parquet_rows(spec.file_uri, spec.start, spec.stop)
    if len(raw) != spec.stop - spec.start:
        raise RuntimeError(f"{spec.file_uri}: expected rows {spec.start}..{spec.stop}, read {len(raw)}; "
                           f"the input changed since the pack plan was made")
    records = [readers.parse_record(job.layout, obj, spec.start + i, f) for i, obj in enumerate(raw)]
    if job.io_threads > 1 and any(r.image_path for r in records):
        with ThreadPoolExecutor(max_workers=job.io_threads) as pool:
            records = list(pool.map(lambda r: _fetch(job, r), records))
    else:
        records = [_fetch(job, r) for r in records]

    errors, parts, current, current_bytes = [], [], [], 0
    for rec in records:
        if rec.error is not None:
            errors.append({"sample_id": rec.sample_id, "source": rec.source, "index": rec.index,
                           "reason": rec.error.reason, "detail": rec.error.detail})
            continue
        row = _row(rec)
        current.append(row)
        current_bytes += _row_bytes(row)
        if current_bytes >= job.target_bytes:
            parts.append(current)
            current, current_bytes = [], 0
    if current:
        parts.append(current)
    shards = []
    for p, rows in enumerate(parts):
        rel = f"shards/{spec.chunk_id}-{p:03d}.parquet"
        nbytes = _write_shard(storage.join(job.output, rel), rows)
        shards.append({"path": rel, "source": spec.source, "rows": len(rows), "bytes": nbytes})
    marker = {"chunk_id": spec.chunk_id, "source": spec.source, "input_rows": len(records),
              "shards": shards, "errors": errors}
    storage.write_text_atomic(_state(job.output, "chunks", f"{spec.chunk_id}.json"), json.dumps(marker))
    return marker


def _estimate_row_bytes(layout: str, f: readers.InputFile, raw: list | None, image_root: str) -> float:
    if raw is None:
        return readers.parquet_bytes_per_row(f.uri)
    if not raw:
        return 1.0
    step = max(1, len(raw) // 16)
    sizes = []
    for i in range(0, len(raw), step)[:16]:
        rec = readers.parse_record(layout, raw[i], i, f)
        n = len(json.dumps(raw[i], default=str)) if not isinstance(raw[i], str) else len(raw[i])
        if rec.error is None and rec.image_path:
            try:
                n += storage.size(_resolve_image(image_root, rec.image_path))
            except (FileNotFoundError, FetchError):
                pass  # becomes an error row when the chunk is packed
        sizes.append(n)
    return sum(sizes) / len(sizes)


def _make_plan(input_uri: str, layout: str, image_root: str, shard_size_mb: float, source: str | None):
    target = int(shard_size_mb * 2**20)
    files, chunks, loaded = [], [], {}
    for f in readers.list_inputs(input_uri, layout, source):
        raw = None if layout == "parquet" else readers.load_records(f, layout)
        n = readers.parquet_num_rows(f.uri) if raw is None else len(raw)
        per_row = _estimate_row_bytes(layout, f, raw, image_root)
        rows_per_chunk = int(min(max(1, target // max(per_row, 1.0)), 1_000_000))
        files.append({"uri": f.uri, "source": f.source, "file_key": f.file_key, "rows": n,
                      "est_row_bytes": per_row})
        for c, start in enumerate(range(0, n, rows_per_chunk)):
            chunks.append({"chunk_id": f"{f.source}-{c:05d}", "file": len(files) - 1, "start": start,
                           "stop": min(n, start + rows_per_chunk)})
        if raw is not None:
            loaded[f.uri] = raw
    plan = {"version": PLAN_VERSION, "layout": layout, "input": str(input_uri), "image_root": image_root,
            "shard_size_mb": shard_size_mb, "source": source, "files": files, "chunks": chunks}
    return plan, loaded


_PLAN_KEYS = ("version", "layout", "input", "image_root", "shard_size_mb", "source")


def _load_or_make_plan(input_uri, layout, output, image_root, shard_size_mb, source):
    plan_uri = _state(output, "plan.json")
    if storage.exists(plan_uri):
        plan = json.loads(storage.read_text(plan_uri))
        wanted = {"version": PLAN_VERSION, "layout": layout, "input": str(input_uri), "image_root": image_root,
                  "shard_size_mb": shard_size_mb, "source": source}
        diff = {k: (plan.get(k), wanted[k]) for k in _PLAN_KEYS if plan.get(k) != wanted[k]}
        if diff:
            raise ValueError(f"{output} already holds a pack made with other settings "
                             f"(saved, requested: {diff}); use a new --output to pack differently")
        return plan, {}
    plan, loaded = _make_plan(input_uri, layout, image_root, shard_size_mb, source)
    storage.write_text_atomic(plan_uri, json.dumps(plan, indent=1))
    return plan, loaded


def _specs(plan: dict) -> list[ChunkSpec]:
    out = []
    for c in plan["chunks"]:
        f = plan["files"][c["file"]]
        out.append(ChunkSpec(c["chunk_id"], f["uri"], f["source"], f["file_key"], c["start"], c["stop"]))
    return out


def _run_ray(job: PackJob, todo: list[tuple[ChunkSpec, list | None]], max_in_flight: int | None) -> None:
    import ray

    if not ray.is_initialized():
        from phantom_ray.runtime import init_ray

        init_ray()
    env = storage.storage_runtime_env()  # endpoint/region of this process for the tasks

    @ray.remote(num_cpus=1, max_retries=2)
    def task(job, spec, raw):
        return pack_chunk(job, spec, raw)

    limit = max_in_flight or max(2, int(2 * ray.cluster_resources().get("CPU", 2)))
    pending, done = [], 0
    for spec, raw in todo:
        if len(pending) >= limit:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            done += 1
            log.info("packed %d/%d chunks", done, len(todo))
        pending.append(task.options(runtime_env=env).remote(job, spec, raw))
    ray.get(pending)


def pack(input: str, layout: str, output: str, image_root: str | None = None, shard_size_mb: float = 256.0,
         source: str | None = None, executor: str = "ray", max_in_flight: int | None = None,
         io_threads: int = 8) -> dict:
    """Pack ``input`` (``layout``) into ``output``; returns the manifest. Resumable: see module doc."""
    if layout not in readers.LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(readers.LAYOUTS)}")
    if shard_size_mb <= 0:
        raise ValueError(f"--shard-size-mb must be > 0, got {shard_size_mb}")
    if executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    image_root = str(image_root) if image_root else readers.default_image_root(input)
    if not storage.is_s3(image_root):  # resolved here, on the driver: Ray workers run in another directory
        image_root = os.path.abspath(image_root)
    manifest_uri = storage.join(output, "manifest.json")
    t0 = time.time()
    plan, loaded = _load_or_make_plan(input, layout, output, image_root, shard_size_mb, source)
    if storage.exists(manifest_uri):
        log.info("%s is complete; nothing to do", output)
        return json.loads(storage.read_text(manifest_uri))

    done_ids = {storage.basename(u)[: -len(".json")] for u in storage.list_files(_state(output, "chunks"), ".json")}
    job = PackJob(layout, output, image_root, int(shard_size_mb * 2**20), io_threads)
    todo = []
    for spec in _specs(plan):
        if spec.chunk_id in done_ids:
            continue
        raw = None
        if layout != "parquet":
            if spec.file_uri not in loaded:
                loaded[spec.file_uri] = readers.load_records(
                    readers.InputFile(spec.file_uri, spec.source, spec.file_key), layout)
            raw = loaded[spec.file_uri][spec.start: spec.stop]
        todo.append((spec, raw))
    log.info("packing %d chunks (%d already done) into %s", len(todo), len(done_ids), output)
    if executor == "local":
        for spec, raw in todo:
            pack_chunk(job, spec, raw)
    else:
        _run_ray(job, todo, max_in_flight)
    return _finalize(plan, output, time.time() - t0)


def _finalize(plan: dict, output: str, seconds: float) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    markers = [json.loads(storage.read_text(_state(output, "chunks", f"{c['chunk_id']}.json")))
               for c in plan["chunks"]]
    sources: dict[str, dict] = {}
    shards, errors = [], []
    for m in markers:
        s = sources.setdefault(m["source"], {"input_rows": 0, "rows": 0, "bytes": 0, "errors": 0, "shards": []})
        s["input_rows"] += m["input_rows"]
        s["errors"] += len(m["errors"])
        for sh in m["shards"]:
            s["rows"] += sh["rows"]
            s["bytes"] += sh["bytes"]
            s["shards"].append(sh["path"])
            shards.append(sh)
        errors.extend(m["errors"])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), sink)
    storage.write_bytes_atomic(storage.join(output, "errors.parquet"), sink.getvalue().to_pybytes())
    manifest = {
        "format": MANIFEST_FORMAT, "layout": plan["layout"], "input": plan["input"],
        "image_root": plan["image_root"], "shard_size_mb": plan["shard_size_mb"],
        "input_rows": sum(s["input_rows"] for s in sources.values()),
        "rows": sum(s["rows"] for s in sources.values()),
        "bytes": sum(s["bytes"] for s in sources.values()),
        "errors": len(errors), "sources": sources, "shards": shards,
        "schema": [f.name for f in PACKED_SCHEMA], "pack_seconds": round(seconds, 3),
    }
    storage.write_text_atomic(storage.join(output, "manifest.json"), json.dumps(manifest, indent=1))
    log.info("packed %d rows (%d errors) into %d shards at %s", manifest["rows"], len(errors), len(shards), output)
    return manifest


def read_manifest(output: str) -> dict:
    uri = storage.join(output, "manifest.json")
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} not found: run `phantom-ray data pack --output {output}` first "
                                f"(or let an interrupted pack finish)")
    return json.loads(storage.read_text(uri))


def read_errors(uri: str) -> list[dict]:
    """Rows of an errors table: a pack's ``errors.parquet`` or a directory of error files."""
    import pyarrow.parquet as pq

    files = storage.list_files(uri, ".parquet")
    rows = []
    for f in files:
        rows.extend(pq.read_table(io.BytesIO(storage.read_bytes(f))).to_pylist())
    return rows
