"""``run_caption``: the captioning job's driver. Resolves the backend, checks the output belongs to
this input and these settings (``_job.json``), makes (or reads) the chunk plan, runs the unfinished
chunks on the autoscaling actor pool of :class:`phantom_ray.caption.stage.ChunkCaptioner`, shows
progress and writes the summary (``_summary.json``).
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any, Callable

from phantom_ray import storage
from phantom_ray.caption.config import CaptionConfig
from phantom_ray.caption.plan import make_plan, output_shards, shard_name
from phantom_ray.caption.stage import ChunkCaptioner, actor_pool
from phantom_ray.loader import is_preset

log = logging.getLogger(__name__)

JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"


def check_job(cfg: CaptionConfig) -> None:
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


def worker_job(cfg: CaptionConfig, engine: str) -> dict[str, Any]:
    """What every :class:`~phantom_ray.caption.stage.ChunkCaptioner` gets (plain JSON-able values:
    it crosses to the actors once, in their constructor); ``engine`` is the resolved backend."""
    return {"output": cfg.output, "format": cfg.format, "model": cfg.model, "engine": engine,
            "dtype": cfg.dtype, "seed": cfg.seed, "max_length": cfg.max_length,
            "attn_implementation": cfg.attn_implementation, "io_threads": cfg.io_threads,
            "sampling": cfg.sampling.to_dict(), "prompt": cfg.prompt, "prompt_column": cfg.prompt_column,
            "batch_size": cfg.batch_size, "max_image_bytes": cfg.max_image_bytes, "max_pixels": cfg.max_pixels,
            "record": {**cfg.job_record(), "engine": engine}}


def run_caption(cfg: CaptionConfig, on_chunk: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Caption every row of ``cfg.input`` not yet in ``cfg.output``; returns (and writes) the summary.
    ``on_chunk(i)`` is called on the driver as each chunk's counts come back."""
    import ray

    from phantom_ray.runtime import init_ray, resolve_num_gpus

    # the backend that runs (and is recorded): auto is vllm where installed, else torch; beam search is
    # torch-only. Resolved first, so a refused combination fails before any planning
    from phantom_ray.infer.api import resolve_backend

    engine = resolve_backend(cfg.engine, cfg.sampling.num_beams, "caption")
    t0 = time.perf_counter()
    if is_preset(cfg.model):
        log.warning("model %r is a preset name: randomly initialised weights (seed %d); captions are noise",
                    cfg.model, cfg.seed)
    check_job(cfg)
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
    replicas: tuple[int, int | None] = (cfg.min_replicas, cfg.max_replicas)
    if pending:
        init_ray(log_to_driver=False)
        num_gpus = resolve_num_gpus(cfg.num_gpus)
        job = worker_job(cfg, engine)
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images, not blocks
        ds = ray.data.from_items([{"chunk": i} for i in pending], override_num_blocks=len(pending))
        # one torch thread per CPU the replica reserves, so replicas sharing a node do not oversubscribe it
        threads = max(1, int(cfg.num_cpus)) if num_gpus == 0 else None
        replicas = replica_bounds(cfg, num_gpus, len(pending))
        ds = ds.map_batches(
            ChunkCaptioner, batch_size=1, compute=actor_pool(engine, replicas[0], replicas[1]),
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
        "replicas": list(replicas), "batch_size": cfg.batch_size,
    }
    storage.write_text_atomic(storage.join(cfg.output, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    return summary


def replica_bounds(cfg: CaptionConfig, num_gpus: float, chunks: int) -> tuple[int, int]:
    """The actor pool's (min, max) replicas. ``max_replicas`` unset: as many as the cluster can hold
    once its autoscaler has grown (:func:`phantom_ray.runtime.max_replicas`), and never more than
    there are chunks to caption (a replica without a chunk only loads a model)."""
    from phantom_ray.runtime import max_replicas

    high = cfg.max_replicas
    if high is None:
        ceiling = max_replicas(num_gpus, cfg.num_cpus)
        high = chunks if ceiling is None else min(ceiling, chunks)
        log.info("replicas: %d..%d (the cluster can hold %s; %d chunks to do)", cfg.min_replicas,
                 max(high, cfg.min_replicas), "any number" if ceiling is None else ceiling, chunks)
    return cfg.min_replicas, max(high, cfg.min_replicas)


def format_summary(s: dict[str, Any]) -> str:
    errs = ", ".join(f"{k}={v}" for k, v in s["errors_by_reason"].items()) or "none"
    return (f"{s['images']} images ({s['images_already_done']} already captioned, {s['images_processed']} now): "
            f"{s['captioned']} captions, {s['errors']} errors ({errs}); {s['generated_tokens']} tokens, "
            f"{s['images_per_s']:.2f} images/s end to end (start-up {s['startup_s']:.1f}s, steady "
            f"{s['steady_s']:.1f}s), wall {s['wall_s']:.1f}s; {s['shards_written']} shards written to {s['output']}")



__all__ = ["run_caption", "worker_job", "check_job", "format_summary", "JOB_FILE", "SUMMARY_FILE"]
