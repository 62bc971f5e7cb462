"""The Phantom training recipe: plain torch + DeepSpeed, no Ray (setup / train / save / resume / export).

Everything is read from the :class:`~phantom_ray.train.config.TrainConfig` passed in; the caller
(the Ray Train adapter, a test, a benchmark) supplies an iterator of collated batches and a
``report`` callable. Two-step recipe of the paper (docs/phantom.md#phantom-optimization):

* step 1 trains ``vision_proj`` and the phantom modules; every other parameter has
  ``requires_grad=False`` and is not given to the optimizer (no optimizer state for it);
* step 2 trains everything (``recipe.freeze_vision`` keeps the vision encoder frozen;
  ``recipe.lora`` wraps the LLM linears with peft LoRA adapters) and starts from step 1's export
  (``model.init_from``).

DeepSpeed: ZeRO stage 0-3 from config, bf16 on GPU and fp32 on CPU, gradient accumulation and
clipping by the engine, a torch AdamW passed in (DeepSpeed-named optimizers JIT-compile for minutes
on CPU), a warm-up + cosine ``LambdaLR`` stepped by the engine and saved in its checkpoints.

Checkpoint layout (one directory per checkpoint, every rank writes into it)::

    <dir>/ds/...                     engine.save_checkpoint (model, optimizer, scheduler shards)
    <dir>/trainer_state-rank<r>.json step, epoch, samples consumed this epoch by rank r, RNG states
    <dir>/train_config.yaml          the config that produced it
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import pickle
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from phantom_ray.train.config import KNOWN_PEAK_FLOPS, TrainConfig
from phantom_ray.train.loss import preference_loss

log = logging.getLogger(__name__)

DS_TAG = "ds"
STATE_PREFIX = "trainer_state-rank"


# ---- distributed helpers ----------------------------------------------------------------------------

def ensure_distributed(backend: str = "gloo") -> None:
    """Initialise a one-process group when nobody did (tests, benchmarks, single-process runs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # a group made by someone else (an in-process vLLM engine, a launcher that sets no env):
        # DeepSpeed still reads the rank variables, so say what the group is
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        if dist.get_world_size() == 1:
            os.environ.setdefault("LOCAL_RANK", "0")
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def forget_stale_deepspeed_groups() -> None:
    """DeepSpeed caches the groups it makes (a clone of the world group, the data-parallel group) at
    module level. When the world they belong to is destroyed and a new one made in the same process
    (an in-process vLLM engine tears its group down; one test process runs many recipes), the cache
    points at unregistered groups and ``deepspeed.initialize`` fails with "Group ... is not
    registered". Drop the cache when any cached group is no longer part of the live world."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    cached = [g for g in (groups._WORLD_GROUP, groups._DATA_PARALLEL_GROUP, groups._MODEL_PARALLEL_GROUP,
                          groups._ZERO_PARAM_INTRA_PARALLEL_GROUP) if g is not None]
    live = dist.distributed_c10d._world.pg_group_ranks if dist.is_initialized() else {}
    if any(g not in live for g in cached):
        groups._release_process_group_references()


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---- model construction -------------------------------------------------------------------------------

def build_model(cfg: TrainConfig):
    from phantom_ray.model import PhantomForCausalLM

    overrides = {} if cfg.model.phantom_eta is None else {"phantom_eta": cfg.model.phantom_eta}
    if cfg.model.init_from:
        model = PhantomForCausalLM.from_pretrained(cfg.model.init_from, dtype=torch.float32,
                                                   attn_implementation=cfg.model.attn_implementation, **overrides)
    else:
        model = PhantomForCausalLM.from_preset(cfg.model.preset, attn_implementation=cfg.model.attn_implementation,
                                               seed=cfg.run.seed, **overrides)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def apply_trainable(model, cfg: TrainConfig) -> list[str]:
    """Set ``requires_grad`` per the recipe step; returns the trainable parameter names."""
    step = cfg.recipe.step
    for name, p in model.named_parameters():
        if step == 1:
            p.requires_grad_(name.startswith("vision_proj.") or "_phantom" in name)
        else:
            p.requires_grad_(not (cfg.recipe.freeze_vision and name.startswith("vision_model.")))
    if step == 2 and cfg.recipe.lora.enabled:
        from phantom_ray.train.lora import wrap_lora

        wrap_lora(model, cfg.recipe.lora)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(f"recipe.step={step}: no trainable parameters")
    return names


def cosine_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def deepspeed_config(cfg: TrainConfig, world_size: int, on_gpu: bool) -> dict:
    ds = cfg.deepspeed
    bf16 = ds.precision == "bf16" or (ds.precision == "auto" and on_gpu)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero |= {"overlap_comm": on_gpu, "contiguous_gradients": True, "reduce_bucket_size": 5e8}
    if ds.zero_stage == 3:
        zero |= {"stage3_gather_16bit_weights_on_model_save": False, "stage3_param_persistence_threshold": 1e5}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    out = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.optim.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    return _merge(out, ds.extra)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flops_per_token(model, trainable: int | None = None) -> float:
    """Training FLOPs per token: 2N forward + 2N backward through activations + 2N_trainable for
    weight gradients (6N when everything trains); attention's L^2 term is left out."""
    n = sum(p.numel() for p in model.parameters())
    t = n if trainable is None else trainable
    return 4.0 * n + 2.0 * t


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.run.peak_flops:
        return cfg.run.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAK_FLOPS.items():
            if key in name:
                return value
    return None


# ---- the recipe -------------------------------------------------------------------------------------

@dataclass
class TrainState:
    step: int = 0                  # optimizer steps done in the run
    epoch: int = 0                 # current epoch
    consumed: list[str] = field(default_factory=list)  # sample keys this rank consumed in the epoch


class PhantomRecipe:
    """setup() -> train_epoch() ... -> save()/resume() -> export(). One instance per worker."""

    def __init__(self, cfg: TrainConfig, device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.engine = None
        self.state = TrainState()
        self.total_steps = 0

    # ---- setup -----------------------------------------------------------------------------------
    def setup(self, total_steps: int, model=None) -> "PhantomRecipe":
        """Build (or take ``model``, e.g. a benchmark's custom size), freeze per step, wrap in DeepSpeed."""
        import deepspeed

        ensure_distributed("nccl" if self.device.type == "cuda" else "gloo")
        forget_stale_deepspeed_groups()
        self.rank, self.world_size = _rank_world()
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg) if model is None else model
        self.trainable_names = apply_trainable(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in params)
        self.flops_per_token = flops_per_token(model, self.num_trainable)
        self.peak = peak_flops(cfg, self.device)
        self.total_steps = max(1, total_steps)
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if cfg.deepspeed.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        else:
            optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_lambda(self.total_steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio))
        if self.device.type == "cuda":
            model.to(self.device)
        ds_config = deepspeed_config(cfg, self.world_size, self.device.type == "cuda")
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.compute_dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
        self.ds_config = ds_config
        return self

    @property
    def model(self):
        return self.engine.module

    # ---- one micro-batch -------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=True)
                if k == "pixel_values":
                    v = v.to(self.compute_dtype)
            out[k] = v
        return out

    def forward_loss(self, batch: dict):
        """Loss of one (padded or packed) batch. The LM head is applied by the loss, chunk by chunk
        (``loss.chunk_tokens``), so no (tokens x vocab) logits exist, at every ZeRO stage: the
        chunked computation runs inside the head module's own forward (``LMHead(h, fused=...)``),
        where ZeRO-3 gathers the partitioned head weight for it and for its backward.
        ``loss.fused_head: false``: the model returns logits and the chunked log-softmax works on those."""
        cfg = self.cfg
        b = self._to_device(batch)
        packed = "segment_ids" in b
        lean = cfg.loss.fused_head
        extra = {"segment_ids": b["segment_ids"], "position_ids": b.get("position_ids")} if packed else {}
        out = self.engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b.get("pixel_values"),
                          phantom_index=b.get("phantom_index"), image_repeat=int(b.get("image_repeat", 1)),
                          return_hidden=lean, **extra)
        paired = int(b.get("image_repeat", 1)) == 2
        has_rejected = None
        if paired:
            B = int(b["num_samples"]) // 2 if packed else b["input_ids"].shape[0] // 2
            has_rejected = b.get("has_rejected", torch.ones(B, dtype=torch.bool, device=self.device))
        return preference_loss(out.logits, b["labels"], kind=cfg.loss.kind, beta=cfg.loss.beta,
                               gamma=cfg.loss.gamma, pref_weight=cfg.loss.pref_weight, sft_weight=cfg.loss.sft_weight,
                               has_rejected=has_rejected, ref_chosen_logps=b.get("ref_chosen_logps"),
                               ref_rejected_logps=b.get("ref_rejected_logps"),
                               ignore_index=self.model.config.ignore_index, hidden=out.hidden_states,
                               head=self.model.language_model.head if lean else None,
                               sample_index=b.get("sample_index") if packed else None,
                               num_samples=int(b["num_samples"]) if packed else None, chunk=cfg.loss.chunk_tokens)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict], max_samples: int | None = None) -> dict[str, float]:
        """Sample-weighted mean of the loss terms over ``batches`` (this rank's), in eval mode; the
        sums and counts are all-reduced over ranks, so every rank returns the same numbers."""
        import torch.distributed as dist

        self.engine.eval()
        keys = ("loss", "sft_loss", "pref_loss", "reward_margin", "pref_accuracy")
        sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
        seen = 0
        for batch in batches:
            n = len(batch.get("sample_key") or batch.get("sample_id") or []) or int(batch["input_ids"].shape[0])
            m = self.forward_loss(batch).metrics()
            sums[:-1] += torch.tensor([m[k] * n for k in keys], dtype=torch.float64)
            sums[-1] += n
            seen += n
            if max_samples is not None and seen >= max_samples:
                break
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            dev = self.device if self.device.type == "cuda" else torch.device("cpu")
            t = sums.to(dev)
            dist.all_reduce(t)
            sums = t.cpu()
        self.engine.train()
        n = float(sums[-1]) or 1.0
        return {f"val/{k}": float(sums[i]) / n for i, k in enumerate(keys)} | {"val/samples": float(sums[-1])}

    def micro_step(self, batch: dict) -> dict[str, float]:
        """Forward + backward of one micro-batch; the engine steps the optimizer at the boundary."""
        self.engine.train()
        result = self.forward_loss(batch)
        self.engine.backward(result.loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            self.state.step += 1
        metrics = result.metrics()
        metrics["optimizer_step"] = float(boundary)
        return metrics

    # ---- an epoch ----------------------------------------------------------------------------------
    def train_epoch(self, batches: Iterable[dict], *, max_steps: int | None = None,
                    on_step: Callable[["PhantomRecipe", dict], None] | None = None) -> dict:
        """Run micro-batches until the iterator ends or ``max_steps`` optimizer steps are done.

        ``on_step(recipe, metrics)`` is called after every optimizer step with the averaged metrics
        of its micro-batches plus throughput (tokens/s, samples/s, data wait, MFU)."""
        it: Iterator[dict] = iter(batches)
        acc: dict[str, float] = {}
        n_micro = tokens = samples = slots = 0
        wait = 0.0
        t_start = time.perf_counter()
        last = {}
        while max_steps is None or self.state.step < max_steps:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - t0
            keys = batch.get("sample_key") or batch.get("sample_id") or []
            m = self.micro_step(batch)
            self.state.consumed.extend(keys)
            tokens += int(batch["attention_mask"].sum())  # real tokens: padding never counts
            slots += int(batch["attention_mask"].numel())
            samples += len(keys) if keys else int(batch["input_ids"].shape[0])
            n_micro += 1
            for k, v in m.items():
                if k != "optimizer_step":
                    acc[k] = acc.get(k, 0.0) + v
            if m["optimizer_step"]:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t_start
                last = {k: v / n_micro for k, v in acc.items()}
                last |= {"step": self.state.step, "epoch": self.state.epoch, "lr": self.scheduler.get_last_lr()[0],
                         "tokens_per_s": tokens / dt, "samples_per_s": samples / dt, "data_wait_s": wait,
                         "step_time_s": dt, "tokens": tokens, "samples": samples,
                         "row_fill": tokens / max(1, slots), "grad_norm": self._grad_norm()}
                if self.peak:
                    last["mfu"] = tokens * self.flops_per_token / dt / self.peak
                if on_step is not None:
                    on_step(self, last)
                acc, n_micro, tokens, samples, slots, wait = {}, 0, 0, 0, 0, 0.0
                t_start = time.perf_counter()
        return last

    def _grad_norm(self) -> float:
        """Global gradient norm of the last optimizer step (before clipping), NaN when unknown."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

    # ---- checkpoints ---------------------------------------------------------------------------------
    def save(self, directory: str, extra: dict | None = None) -> None:
        """Every rank calls this with a local directory (the engine writes its shards there)."""
        os.makedirs(directory, exist_ok=True)
        self.engine.save_checkpoint(directory, tag=DS_TAG)
        state = {"step": self.state.step, "epoch": self.state.epoch, "consumed": self.state.consumed,
                 "rank": self.rank, "world_size": self.world_size, "rng": _rng_state(), **(extra or {})}
        with open(os.path.join(directory, f"{STATE_PREFIX}{self.rank}.json"), "w") as f:
            json.dump(state, f)
        if self.rank == 0:
            self.cfg.save(os.path.join(directory, "train_config.yaml"))

    def resume(self, directory: str) -> TrainState:
        """Load engine (model, optimizer, scheduler), step, epoch, data position and this rank's RNG."""
        load_path, _ = self.engine.load_checkpoint(directory, tag=DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint (tag {DS_TAG!r}) to resume from")
        states = read_trainer_states(directory)
        mine = states.get(self.rank) or states[min(states)]
        consumed = sorted({k for s in states.values() for k in s["consumed"]})
        # The resumed epoch's remaining rows are re-split among ranks: the consumed list of the
        # epoch is kept whole on rank 0 so that the next checkpoint still records all of it.
        self.state = TrainState(step=mine["step"], epoch=mine["epoch"], consumed=consumed if self.rank == 0 else [])
        if states.get(self.rank):
            _set_rng_state(mine["rng"])
        return self.state

    def start_epoch(self, epoch: int) -> None:
        if epoch != self.state.epoch:
            self.state.epoch, self.state.consumed = epoch, []

    # ---- export ----------------------------------------------------------------------------------------
    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights on rank 0 (gathered parameter by parameter under ZeRO-3), None elsewhere."""
        import deepspeed

        module = self.model
        sd = {}
        zero3 = self.cfg.deepspeed.zero_stage == 3
        for name, p in module.named_parameters():
            if zero3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if self.rank == 0:
                        sd[name] = p.detach().float().cpu().clone()
            elif self.rank == 0:
                sd[name] = p.detach().float().cpu().clone()
        if self.rank == 0:
            for name, b in module.named_buffers():
                sd[name] = b.detach().cpu().clone()
        return sd if self.rank == 0 else None

    def export(self, uri: str) -> str | None:
        """All ranks call; rank 0 writes an HF-layout model + tokenizer + train config to ``uri``."""
        sd = self.consolidated_state_dict()
        if self.rank != 0:
            return None
        from phantom_ray.model import PhantomForCausalLM
        from phantom_ray.train import lora

        extra = tokenizer_files(self.cfg, self.model.config)
        lc = self.cfg.recipe.lora
        if lc.enabled:
            if not lc.merge_on_export:
                extra |= lora.adapter_files(sd, lc)
            sd = lora.merged_state_dict(self.model, sd) if lc.merge_on_export else lora.base_state_dict(sd)
        out = PhantomForCausalLM(self.model.config, attn_implementation="sdpa")
        missing, unexpected = out.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k in dict(out.named_parameters())]
        if missing:
            raise RuntimeError(f"export: weights missing for {missing[:5]} ...")
        extra["train_config.yaml"] = self.cfg.to_yaml().encode()
        out.save_pretrained(uri, extra_files=extra)
        return uri


def tokenizer_files(cfg: TrainConfig, config=None) -> dict[str, bytes]:
    """The tokenizer files (and chat template) of the model being trained, to save next to its weights."""
    from phantom_ray.processing import load_tokenizer
    from phantom_ray.processing.tokenizers import tokenizer_files as files_of

    source = cfg.model.init_from or cfg.model.preset
    tok = load_tokenizer(source, config)
    if config is None:
        from phantom_ray.loader import load_config

        config = load_config(source)
    return files_of(tok, config)


def read_trainer_states(directory: str) -> dict[int, dict]:
    states = {}
    for name in os.listdir(directory):
        if name.startswith(STATE_PREFIX) and name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                s = json.load(f)
            states[int(s["rank"])] = s
    if not states:
        raise FileNotFoundError(f"{directory}: no {STATE_PREFIX}*.json (not a phantom_ray checkpoint)")
    return states


def _rng_state() -> dict:
    import numpy as np

    blob = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        blob["cuda"] = torch.cuda.get_rng_state_all()
    return {"pickle": base64.b64encode(pickle.dumps(blob)).decode()}


def _set_rng_state(state: dict) -> None:
    import numpy as np

    blob = pickle.loads(base64.b64decode(state["pickle"]))
    torch.set_rng_state(blob["torch"])
    np.random.set_state(blob["numpy"])
    random.setstate(blob["python"])
    if "cuda" in blob and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda"])
