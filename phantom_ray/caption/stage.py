"""The Ray Data worker stage of captioning: ``ChunkCaptioner``, a callable class on the autoscaling
actor pool. Each actor holds one engine (``load_engine(model, backend=...)``); per chunk id it reads
the chunk's plan rows, fetches and opens their images on I/O threads ahead of the model, generates,
and writes the chunk's shard itself in one atomic PUT/rename. Only counts go back to the driver.

How the engine is fed: the torch engine takes ``batch_size`` images per ``generate`` call (its
batches are the unit of parallelism). The vllm engine batches continuously, so it gets each request
as soon as its image is open (``VLLMEngine.submit``), up to :data:`VLLM_IN_FLIGHT` per chunk (or
``batch_size`` if larger), and each actor works on :data:`VLLM_CHUNKS_PER_ACTOR` chunks at once
(Ray Data's ``max_concurrent_calls_per_actor``): while one chunk's shard is written and the next
plan read, the other's requests keep vLLM busy. Why not ``ray.data.llm``'s vLLM stage: its rows
come back as a dataset to write, where ours must stay one chunk = one shard written once by the
actor that captioned it (exactly-once resume), error rows must carry our ingest reason codes for
images vLLM never sees, and the manifest's columns pass through untouched; its engine stage gives
nothing this does not (it is the same AsyncLLM with requests in flight).
"""

from __future__ import annotations

import collections
import io
import json
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from phantom_ray import storage
from phantom_ray.caption.config import ADDED_COLUMNS
from phantom_ray.caption.plan import URI_COLUMN, chunk_uri, parquet_bytes, read_shard, shard_name, table_from_rows
from phantom_ray.errors import row_reason
from phantom_ray.infer.api import Request, SamplingParams
from phantom_ray.ingest import DEFAULT_LIMITS, ImageLimits, InputError, load_image

METADATA_KEY = b"phantom_ray.caption"
VLLM_IN_FLIGHT = 256         # requests in flight per chunk on the vllm engine (bounds images held open)
VLLM_CHUNKS_PER_ACTOR = 2    # chunks one vllm replica works on at once


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
    return parquet_bytes(table)




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


        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.job = job
        self.sampling = SamplingParams.from_dict(job["sampling"])
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
                table = table_from_rows(read_shard(shard))
            return {**_shard_counts(table), "written": False}
        plan = pq.read_table(io.BytesIO(storage.read_bytes(chunk_uri(job["output"], i))))
        uris = plan.column(URI_COLUMN).to_pylist()
        n = len(uris)
        pcol = job["prompt_column"]
        prompts = plan.column(pcol).to_pylist() if pcol else [job["prompt"]] * n
        added = _added_arrays(n)
        added["prompt"] = [p if isinstance(p, str) else None for p in prompts]
        bs = job["batch_size"]

        def load(j: int):  # the one image-ingest function: read, then byte/pixel/aspect/format limits
            return load_image(uris[j], None, self.limits)

        # images are fetched and opened on I/O threads ahead of the model
        futures: dict[int, Any] = {}
        submitted = 0

        def submit_upto(k: int) -> int:
            for j in range(submitted, min(n, k)):
                futures[j] = self.pool.submit(load, j)
            return max(submitted, min(n, k))

        def record(j: int, g) -> None:
            added["caption"][j] = g.text.strip() if g.text is not None else None  # the answer, unpadded
            added["prompt_tokens"][j] = g.prompt_tokens
            added["generated_tokens"][j] = g.completion_tokens
            added["finish_reason"][j] = g.finish_reason
            added["latency_s"][j] = g.latency_s
            added["error"][j] = row_reason(g.error) if g.error else None
            added["error_detail"][j] = g.error_detail

        def request(j: int):
            """Row j's request, or None with its error recorded."""
            prompt = added["prompt"][j]
            try:
                img = futures.pop(j).result()
            except InputError as exc:
                added["error"][j], added["error_detail"][j] = row_reason(exc.reason), exc.detail
                return None
            if not prompt:
                added["error"][j] = "missing_prompt"
                added["error_detail"][j] = f"row {j} of chunk {i}: column {pcol!r} is empty or not text"
                return None
            return Request.user(prompt, images=[img], params=self.sampling, key=uris[j])

        if hasattr(self.engine, "submit"):  # continuous batching: every open image goes straight in
            window = max(bs, VLLM_IN_FLIGHT)
            submitted = submit_upto(window)
            running: dict[Any, int] = {}
            for j in range(n):
                if len(running) >= window:  # wait for one to finish before opening more images
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for f in done:
                        record(running.pop(f), f.result())
                req = request(j)
                submitted = submit_upto(j + 1 + window)
                if req is not None:
                    running[self.engine.submit(req)] = j
            for f, j in running.items():
                record(j, f.result())
        else:  # batches of bs, images opened up to two batches ahead of the model
            submitted = submit_upto(3 * bs)
            for start in range(0, n, bs):
                idx, reqs = [], []
                for j in range(start, min(n, start + bs)):
                    req = request(j)
                    if req is not None:
                        idx.append(j)
                        reqs.append(req)
                submitted = submit_upto(start + 4 * bs)
                if reqs:
                    for j, g in zip(idx, self.engine.generate(reqs)):
                        record(j, g)
        for j in range(n):
            if added["error"][j] is not None:
                added["caption"][j] = None
            for c in ("prompt_tokens", "generated_tokens"):
                if added[c][j] is None:
                    added[c][j] = 0
        table = _output_table(plan, added, job["record"])
        storage.write_bytes_atomic(shard, _encode_shard(table, job["format"]))
        return {**_shard_counts(table), "written": True}




def actor_pool(engine: str, min_size: int, max_size: int, calls_per_actor: int = VLLM_CHUNKS_PER_ACTOR):
    """The autoscaling actor pool of captioning (and eval) replicas: on vllm, each actor takes
    ``calls_per_actor`` calls at once (they feed one engine; see the module docstring).

    The pool starts ``max_size`` actors (``initial_size``) and shrinks towards ``min_size`` when they
    idle. Ray Data grows a pool only into resources the cluster has now, so on an autoscaling cluster
    that starts without model nodes a pool starting at ``min_size`` never grows; its pending actors
    are what the cluster autoscaler adds nodes for (docs/scaling.md). A request of our own through
    ``ray.autoscaler.sdk.request_resources`` does not hold: Ray Data's autoscaling coordinator sends
    the merged request of its executors with the same call and replaces it, and the nodes it had
    started idled out and were started again. ``max_size`` is bounded by what the cluster can hold
    (``phantom_ray.caption.job.replica_bounds``)."""
    from ray.data import ActorPoolStrategy

    if engine == "vllm":
        return ActorPoolStrategy(min_size=min_size, max_size=max_size, initial_size=max_size,
                                 max_concurrent_calls_per_actor=calls_per_actor, enable_true_multi_threading=True)
    return ActorPoolStrategy(min_size=min_size, max_size=max_size, initial_size=max_size)


__all__ = ["ChunkCaptioner", "actor_pool", "load_caption_engine", "METADATA_KEY"]
