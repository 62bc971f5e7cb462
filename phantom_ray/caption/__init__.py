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

(plan: ``plan.py``; caption: ``stage.py``; count and the whole run: ``job.py``)

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
against another input into the same output is refus

Modules: ``config.py`` (:class:`CaptionConfig`), ``plan.py`` (listing, manifests, the chunk plan,
output shard names and readers), ``stage.py`` (the Ray Data worker stage, ``ChunkCaptioner``),
``job.py`` (:func:`run_caption`, the driver), ``cli.py`` (``phantom-ray caption``, ``jobs/caption.py``).

    from phantom_ray.caption import CaptionConfig, run_caption
    summary = run_caption(CaptionConfig(input="s3://b/images/", output="s3://b/captions/", model="s3://b/export"))
"""

from __future__ import annotations

from phantom_ray.caption.config import ADDED_COLUMNS, DEFAULT_PROMPT, CaptionConfig

__all__ = ["CaptionConfig", "DEFAULT_PROMPT", "ADDED_COLUMNS", "run_caption", "read_outputs", "format_summary"]


def __getattr__(name):
    # lazy: the job and the plan readers import pyarrow/Ray only when used
    import importlib

    if name in ("run_caption", "format_summary"):
        return getattr(importlib.import_module("phantom_ray.caption.job"), name)
    if name == "read_outputs":
        return importlib.import_module("phantom_ray.caption.plan").read_outputs
    raise AttributeError(f"module 'phantom_ray.caption' has no attribute {name!r}")
