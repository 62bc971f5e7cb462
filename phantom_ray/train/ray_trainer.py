"""The thin Ray Train adapter: TorchTrainer around :class:`~phantom_ray.train.recipe.PhantomRecipe`.

    result = run_training(TrainConfig.from_yaml("configs/train/tiny-cpu.yaml"))
    print(result["export"])

What Ray supplies and nothing more: the worker group (``ScalingConfig`` from ``scaling``), the
process group (gloo on CPU, NCCL on GPU), each worker's shard of the epoch's dataset from
:func:`phantom_ray.data.pipeline.build_train_dataset` (one dataset per epoch, ``train_e<k>``),
``ray.train.report`` of metrics every ``run.report_every`` steps and of a DeepSpeed checkpoint every
``run.checkpoint_every`` steps and at the end (every rank writes its shards into a local directory
and reports it; Ray merges them under ``RunConfig.storage_path``, local or S3).

Failures and resume. A lost worker fails the attempt; the driver then starts a new attempt of the
same run (same ``RunConfig(name, storage_path)``, the Ray 2.60 way to resume) from the latest
complete checkpoint, at most ``run.max_failures`` times. Starting ``run_training`` again on an
interrupted run's storage path resumes it the same way. Resuming restores model, optimizer,
scheduler, every rank's RNG and the data position: the checkpoint lists the samples consumed in
its epoch, and the new attempt's dataset for that epoch leaves them out, so no sample is repeated
or skipped (beyond the partial step in flight when the worker died). This is done by the driver,
not by Ray's in-attempt restart (``FailureConfig(max_failures=...)``), because Ray re-runs a
restarted group on the dataset it was built with, which would repeat the consumed samples.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any

from phantom_ray import storage
from phantom_ray.train.config import TrainConfig
from phantom_ray.train.recipe import STATE_PREFIX

log = logging.getLogger(__name__)


# ---- checkpoints on storage ---------------------------------------------------------------------------

def list_checkpoints(cfg: TrainConfig) -> list[dict]:
    """Complete checkpoints of the run (every rank's trainer state present), oldest first:
    ``[{"uri", "step", "epoch", "consumed": set}]``."""
    root = storage.join(_storage_root(cfg), cfg.run.name)
    if not storage.exists(root):
        return []
    by_dir: dict[str, list[str]] = {}
    for uri in storage.list_files(root, ".json"):
        name = storage.basename(uri)
        if name.startswith(STATE_PREFIX):
            by_dir.setdefault(uri[: -len(name) - 1], []).append(uri)
    out = []
    for d, files in by_dir.items():
        states = [json.loads(storage.read_text(f)) for f in files]
        world = states[0]["world_size"]
        if len({s["rank"] for s in states}) != world:
            continue  # a rank died before its files were uploaded
        out.append({"uri": d, "step": states[0]["step"], "epoch": states[0]["epoch"],
                    "consumed": {k for s in states for k in s["consumed"]}})
    return sorted(out, key=lambda c: (c["step"], c["uri"]))


def _storage_root(cfg: TrainConfig) -> str:
    p = cfg.run.storage_path
    return p if storage.is_s3(p) else os.path.abspath(p)


def prepare_synthetic(cfg: TrainConfig) -> None:
    """Write + pack the synthetic corpus into ``data.shards[0]`` if ``synth.enabled`` and not done yet."""
    from phantom_ray.data.pack import pack
    from phantom_ray.data.synth import LAYOUT_FILES, synthesize

    root = cfg.data.shards[0]
    if not cfg.synth.enabled:
        return
    src = storage.join(root, "_synth")
    if not storage.exists(storage.join(root, "manifest.json")):
        synthesize(src, num_samples=cfg.synth.num_samples, layout=cfg.synth.layout, seed=cfg.synth.seed,
                   image_size=cfg.synth.image_size)
        pack(storage.join(src, LAYOUT_FILES[cfg.synth.layout]), cfg.synth.layout, root, shard_size_mb=1.0,
             source="synth", executor="local")
    val = (cfg.data.val_shards or [None])[0]
    if val and not storage.exists(storage.join(val, "manifest.json")):  # the held-out split, for validation
        pack(synth_heldout(cfg), cfg.synth.layout, val, shard_size_mb=1.0, source="synth", executor="local")


def synth_heldout(cfg: TrainConfig) -> str:
    """The synthetic corpus' held-out records (JSON), written by :func:`prepare_synthetic`."""
    from phantom_ray.data.synth import LAYOUT_FILES

    return storage.join(cfg.data.shards[0], "_synth", "heldout", LAYOUT_FILES[cfg.synth.layout])


# ---- datasets --------------------------------------------------------------------------------------------

def _drop_consumed(batch, consumed: frozenset):
    import pyarrow as pa

    keys = [f"{s}#{r}" for s, r in zip(batch.column("sample_id").to_pylist(), batch.column("repeat").to_pylist())]
    return batch.filter(pa.array([k not in consumed for k in keys]))


class ReferenceScorer:
    """map_batches actor for ``loss.kind='dpo'``: appends the frozen reference model's answer
    log-probs (``ref_chosen_logp``, ``ref_rejected_logp``) to processed PO rows, in a Ray Data pass
    before training, so that only the policy is in memory on the training workers."""

    def __init__(self, reference: str, processor_model: str, cfg_data: dict):
        import torch

        from phantom_ray.data.pipeline import CollateProcessed, DataConfig, default_processor_factory
        from phantom_ray.loader import load_weights

        data = DataConfig.from_dict(cfg_data)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # dtype auto: bfloat16 on CUDA, float32 on CPU
        self.model, _ = load_weights(reference, device=self.device, dtype="auto")
        self.collate = CollateProcessed(default_processor_factory(processor_model, data.max_length), "po",
                                        data.padding_side, data.pixel_dtype)

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa
        import torch

        from phantom_ray.train.loss import sequence_logps

        cols = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.column_names}
        b = self.collate(cols)
        with torch.no_grad():
            pv = b["pixel_values"]
            out = self.model(b["input_ids"].to(self.device), b["attention_mask"].to(self.device),
                             None if pv is None else pv.to(self.device, self.model.dtype),
                             phantom_index=b["phantom_index"].to(self.device), image_repeat=2)
            logps, _ = sequence_logps(out.logits, b["labels"].to(self.device))
        n = batch.num_rows
        logps = logps.float().cpu().numpy()
        batch = batch.append_column("ref_chosen_logp", pa.array(np.asarray(logps[:n], dtype=np.float32)))
        return batch.append_column("ref_rejected_logp", pa.array(np.asarray(logps[n:], dtype=np.float32)))


def with_reference_logps(ds, cfg: TrainConfig):
    """The dataset with reference log-prob columns (one scoring actor; a GPU when training on GPUs)."""
    from ray.data import ActorPoolStrategy

    reference = cfg.loss.reference or cfg.model.init_from
    if not reference:
        raise ValueError("loss.kind='dpo' needs loss.reference (or model.init_from): the frozen reference model")
    return ds.map_batches(
        ReferenceScorer, batch_format="pyarrow", batch_size=cfg.data.preprocess_batch_size,
        fn_constructor_kwargs={"reference": reference, "processor_model": cfg.model.model_id(),
                               "cfg_data": cfg.data.to_dict()},
        compute=ActorPoolStrategy(size=1), runtime_env=storage.storage_runtime_env() or None,
        num_cpus=cfg.data.preprocess_num_cpus, num_gpus=1 if cfg.scaling.use_gpu else 0)


def epoch_datasets(cfg: TrainConfig, start_epoch: int = 0, consumed: set[str] | None = None) -> dict:
    """``{"train_e<k>": Dataset}`` for the epochs still to run; the first leaves out ``consumed``."""
    from phantom_ray.data.pipeline import build_train_dataset

    out = {}
    for epoch in range(start_epoch, cfg.run.epochs):
        ds = build_train_dataset(cfg.data, epoch=epoch)
        if consumed and epoch == start_epoch:
            ds = ds.map_batches(_drop_consumed, batch_format="pyarrow", fn_kwargs={"consumed": frozenset(consumed)})
        if cfg.loss.kind == "dpo":
            ds = with_reference_logps(ds, cfg)
        out[f"train_e{epoch}"] = ds
    return out


def val_dataset(cfg: TrainConfig):
    """The validation rows (``data.val_shards``, processed like training rows, not shuffled), or None."""
    import dataclasses

    from phantom_ray.data.pipeline import build_train_dataset

    if not cfg.data.val_shards:
        return None
    vcfg = dataclasses.replace(cfg.data, shards=list(cfg.data.val_shards), val_shards=None, mixture=None,
                               epoch_samples=None, shuffle=False, errors_output=None)
    return build_train_dataset(vcfg, epoch=0)


def plan_steps(cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) from the packed row count of epoch 0."""
    from phantom_ray.data.pipeline import build_train_dataset

    rows = build_train_dataset(cfg.data, epoch=0, preprocess=False).count()
    per_worker = rows // cfg.scaling.num_workers
    micro = per_worker // cfg.data.batch_size if cfg.data.drop_last else math.ceil(per_worker / cfg.data.batch_size)
    per_epoch = max(1, micro // cfg.optim.grad_accum)
    total = cfg.run.max_steps or per_epoch * cfg.run.epochs
    return per_epoch, total


class CollateWithKeys:
    """The pipeline's collate plus ``sample_key`` ("<sample_id>#<repeat>") for the data position."""

    def __init__(self, processor, cfg):
        from phantom_ray.data.pipeline import CollateProcessed

        self.inner = CollateProcessed(processor, cfg.task, cfg.padding_side, cfg.pixel_dtype, cfg.max_tokens_per_row)

    def __call__(self, batch):
        out = self.inner(batch)
        out["sample_key"] = [f"{s}#{int(r)}" for s, r in zip(batch["sample_id"], batch["repeat"])]
        if "ref_chosen_logp" in batch:  # loss.kind='dpo': precomputed by ReferenceScorer
            import torch

            out["ref_chosen_logps"] = torch.as_tensor(batch["ref_chosen_logp"], dtype=torch.float32)
            out["ref_rejected_logps"] = torch.as_tensor(batch["ref_rejected_logp"], dtype=torch.float32)
        return out


# ---- the worker loop -----------------------------------------------------------------------------------

def _heldout_accuracy(recipe, cfg: TrainConfig, processor) -> dict:
    """Synthetic corpus only: closed-answer accuracy of the model being trained on held-out records."""
    from phantom_ray.train.evaluate import choice_accuracy_of

    model = recipe.model
    was_training = model.training
    model.eval()
    try:
        acc = choice_accuracy_of(model, processor, synth_heldout(cfg), limit=cfg.data.val_max_samples)
    finally:
        model.train(was_training)
    return {"val/heldout_accuracy": acc["accuracy"], "val/heldout_chance": acc["chance"]}


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. Environment (S3 credentials and endpoint) comes from the job's Ray
    ``runtime_env``, not from this function."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from phantom_ray.data.pipeline import default_processor_factory
    from phantom_ray.train.recipe import PhantomRecipe
    from phantom_ray.train.tracking import Tracker

    cfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    try:
        import ray.train.torch as rtt

        device = rtt.get_device()
    except (ImportError, RuntimeError):
        device = "cpu"
    total = config["total_steps"]
    recipe = PhantomRecipe(cfg, device).setup(total)
    if config.get("resume"):
        with tempfile.TemporaryDirectory(prefix="phantom-resume-") as local:
            storage.download_dir(config["resume"], local)
            recipe.resume(local)
    processor = default_processor_factory(cfg.model.model_id(), cfg.data.max_length)
    step_callbacks = config.get("step_callbacks") or []
    tracker = None
    if rank == 0:  # metrics.jsonl always; event files / MLflow per run.tracking
        tracker = Tracker(cfg.run.run_dir(), cfg.run.tracking, cfg.run.name, cfg.run.mlflow_tracking_uri,
                          params={"lr": cfg.optim.lr, "loss": cfg.loss.kind, "step": cfg.recipe.step})
    last_ckpt_step = recipe.state.step
    val_batches: list[dict] | None = None

    def validate() -> dict:
        nonlocal val_batches
        if val_batches is None:  # the same held-out batches every time, as many on every rank
            shard = ray.train.get_dataset_shard("val")
            val_batches, seen = [], 0
            for b in shard.iter_torch_batches(batch_size=cfg.data.batch_size,
                                              collate_fn=CollateWithKeys(processor, cfg.data)):
                val_batches.append(b)
                seen += len(b["sample_key"])
                if seen >= cfg.data.val_max_samples:
                    break
            n = torch.tensor([len(val_batches)])
            dist.all_reduce(n, op=dist.ReduceOp.MIN)  # ZeRO-3 forwards are collective: same count per rank
            val_batches = val_batches[: int(n)]
        out = recipe.evaluate(val_batches)
        if cfg.synth.enabled and cfg.synth.layout == "triples" and rank == 0 and cfg.deepspeed.zero_stage != 3:
            out |= _heldout_accuracy(recipe, cfg, processor)
        return out

    def report(metrics: dict, with_checkpoint: bool) -> None:
        nonlocal last_ckpt_step
        per_worker = [None] * ctx.get_world_size()
        dist.all_gather_object(per_worker, {k: metrics.get(k) for k in ("tokens_per_s", "samples_per_s", "data_wait_s",
                                                                       "mfu")})
        metrics = dict(metrics)
        for k in ("tokens_per_s", "samples_per_s", "data_wait_s", "mfu"):
            if metrics.get(k) is not None:
                metrics[f"{k}_per_worker"] = [w[k] for w in per_worker]
        if rank == 0:  # Ray 2.60 keeps only checkpointed metrics in the Result: log every report too
            shown = {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()
                     if not k.endswith("_per_worker")}
            print(f"[phantom-train] {json.dumps(shown, default=str)}", flush=True)
            if tracker is not None and not metrics.get("done"):
                train = {k: v for k, v in metrics.items()
                         if not k.startswith("val/") and (k in ("loss", "sft_loss", "pref_loss", "reward_margin",
                                                                "pref_accuracy", "lr", "grad_norm", "tokens_per_s",
                                                                "samples_per_s", "row_fill", "mfu", "epoch"))}
                tracker.log(metrics["step"], train, "train")
                val = {k: v for k, v in metrics.items() if k.startswith("val/")}
                if val:
                    tracker.log(metrics["step"], val, "val")
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="phantom-ckpt-") as d:
            recipe.save(d)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        last_ckpt_step = recipe.state.step

    has_val = bool(cfg.data.val_shards)

    def on_step(rec, metrics):
        step = rec.state.step
        for cb in step_callbacks:  # test-only fault injection (tests pass them; production passes none)
            cb(rank, step)
        if has_val and cfg.run.val_every and (step % cfg.run.val_every == 0 or step >= total):
            metrics = metrics | validate()
        if step % cfg.run.checkpoint_every == 0 or step >= total:
            report(metrics, with_checkpoint=True)
        elif step % cfg.run.report_every == 0 or any(k.startswith("val/") for k in metrics):
            report(metrics, with_checkpoint=False)

    metrics: dict[str, Any] = {}
    for epoch in range(recipe.state.epoch, cfg.run.epochs):
        if recipe.state.step >= total:
            break
        recipe.start_epoch(epoch)
        shard = ray.train.get_dataset_shard(f"train_e{epoch}")
        batches = shard.iter_torch_batches(
            batch_size=cfg.data.batch_size, collate_fn=CollateWithKeys(processor, cfg.data),
            prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer_size if cfg.data.shuffle and cfg.data.shuffle_buffer_size else None,
            local_shuffle_seed=(cfg.data.seed * 1_000_003 + epoch * 1009 + rank) % 2**31 if cfg.data.shuffle else None,
            drop_last=cfg.data.drop_last)
        metrics = recipe.train_epoch(batches, max_steps=total, on_step=on_step) or metrics
    export = cfg.run.export_uri()
    final = {"step": recipe.state.step, "epoch": recipe.state.epoch, "export": export, "done": True,
             **{k: v for k, v in metrics.items() if k not in ("step", "epoch")}}
    if last_ckpt_step != recipe.state.step:
        report(final, with_checkpoint=True)
    recipe.export(export)
    report(final, with_checkpoint=False)
    if tracker is not None:
        tracker.close()


# ---- the driver -------------------------------------------------------------------------------------------

def run_training(cfg: TrainConfig, *, step_callbacks: list | None = None) -> dict:
    """Train per ``cfg`` on the current Ray cluster (a local one is started when none is); returns
    the final metrics (``export`` included).

    Relative paths in ``cfg`` are resolved here, on the driver, against the current directory,
    before anything reaches Ray. ``step_callbacks``: test-only, picklable ``cb(rank, step)`` called
    by every worker after each optimizer step (fault injection); production runs pass none."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from phantom_ray.data.pipeline import ingest_options

    cfg = cfg.resolved()
    if not ray.is_initialized():
        from phantom_ray.runtime import init_ray

        # the workers get S3 settings from the job's runtime_env (a cluster job sets its own)
        init_ray(runtime_env=storage.storage_runtime_env() or None)
    prepare_synthetic(cfg)
    per_epoch, total = plan_steps(cfg)
    log.info("training %s: %d steps per epoch, %d steps in all", cfg.run.name, per_epoch, total)
    fs, path = storage.pyarrow_fs(_storage_root(cfg))
    failures = 0
    while True:
        ckpts = list_checkpoints(cfg)
        latest = ckpts[-1] if ckpts else None
        if latest:
            log.info("resuming %s from %s (step %d, epoch %d, %d samples consumed in the epoch)",
                     cfg.run.name, latest["uri"], latest["step"], latest["epoch"], len(latest["consumed"]))
        datasets = epoch_datasets(cfg, latest["epoch"] if latest else 0, latest["consumed"] if latest else None)
        if not datasets:  # a finished run: one empty epoch so that the loop still exports
            datasets = epoch_datasets(cfg, cfg.run.epochs - 1, None)
        val = val_dataset(cfg) if cfg.run.val_every else None
        if val is not None:
            datasets["val"] = val
        loop_config = {"train": cfg.to_dict(), "total_steps": total, "resume": latest["uri"] if latest else None,
                       "step_callbacks": list(step_callbacks or [])}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            datasets=datasets,
            scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                         resources_per_worker=cfg.scaling.resources()),
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
            # reproducible input: every dataset streamed in order, split by the data alone (data.deterministic)
            dataset_config=ray.train.DataConfig(execution_options=ingest_options(cfg.data)),
            run_config=RunConfig(name=cfg.run.name, storage_path=path, storage_filesystem=fs,
                                 failure_config=FailureConfig(max_failures=0),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep)),
        )
        try:
            result = trainer.fit()
        except TrainingFailedError as exc:
            failures += 1
            if failures > cfg.run.max_failures:
                raise
            log.warning("attempt %d of %s failed (%s); restarting from the latest checkpoint", failures,
                        cfg.run.name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        metrics = dict(result.metrics or {})
        metrics["failures"] = failures
        metrics.setdefault("export", cfg.run.export_uri())
        return metrics
