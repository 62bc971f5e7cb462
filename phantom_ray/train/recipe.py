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
        model.language_model = _wrap_lora(model.language_model, cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(f"recipe.step={step}: no trainable parameters")
    return names


def _wrap_lora(llm, cfg: TrainConfig):
    try:
        import peft
    except ImportError:
        raise ImportError("recipe.lora.enabled needs `peft` (pip install peft)") from None
    lc = cfg.recipe.lora
    # phantom modules stay fully trainable next to the adapters
    phantom = sorted({n.rsplit(".", 1)[0] for n, _ in llm.named_parameters() if "_phantom" in n})
    config = peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                             modules_to_save=None)
    wrapped = peft.inject_adapter_in_model(config, llm)
    for n, p in wrapped.named_parameters():
        p.requires_grad_("lora_" in n or any(n.startswith(m) for m in phantom))
    return wrapped


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
        cfg = self.cfg
        b = self._to_device(batch)
        out = self.engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b.get("pixel_values"),
                          phantom_index=b.get("phantom_index"), image_repeat=int(b.get("image_repeat", 1)))
        paired = int(b.get("image_repeat", 1)) == 2
        has_rejected = None
        if paired:
            B = b["input_ids"].shape[0] // 2
            has_rejected = b.get("has_rejected", torch.ones(B, dtype=torch.bool, device=self.device))
        return preference_loss(out.logits, b["labels"], kind=cfg.loss.kind, beta=cfg.loss.beta,
                               gamma=cfg.loss.gamma, pref_weight=cfg.loss.pref_weight, sft_weight=cfg.loss.sft_weight,
                               has_rejected=has_rejected, ref_chosen_logps=b.get("ref_chosen_logps"),
                               ref_rejected_logps=b.get("ref_rejected_logps"),
                               ignore_index=self.model.config.ignore_index)

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
        n_micro = tokens = samples = 0
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
            tokens += int(batch["attention_mask"].sum())
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
                         "step_time_s": dt, "tokens": tokens, "samples": samples}
                if self.peak:
                    last["mfu"] = tokens * self.flops_per_token / dt / self.peak
                if on_step is not None:
                    on_step(self, last)
                acc, n_micro, tokens, samples, wait = {}, 0, 0, 0, 0.0
                t_start = time.perf_counter()
        return last

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
        model = _unwrap_lora(self.model, sd) if self.cfg.recipe.lora.enabled else None
        from phantom_ray.model import PhantomForCausalLM

        out = PhantomForCausalLM(self.model.config, attn_implementation="sdpa")
        if model is not None:
            sd = model
        missing, unexpected = out.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k in dict(out.named_parameters())]
        if missing:
            raise RuntimeError(f"export: weights missing for {missing[:5]} ...")
        extra = tokenizer_files(self.cfg)
        extra["train_config.yaml"] = self.cfg.to_yaml().encode()
        out.save_pretrained(uri, extra_files=extra)
        return uri


def _unwrap_lora(module, sd: dict) -> dict:
    """Merge LoRA deltas into the base weights: W + (alpha/r) * B @ A; drop adapter keys."""
    out = {}
    for k, v in sd.items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    for k in sd:
        if ".lora_A." in k:
            base = k.split(".lora_A.")[0]
            adapter = k.split(".lora_A.")[1].split(".")[0]
            a = sd[k]
            b = sd[f"{base}.lora_B.{adapter}.weight"]
            layer = module.get_submodule(base)
            scale = layer.scaling[adapter]
            key = f"{base}.weight"
            out[key] = out[key] + scale * (b @ a)
    return out


def tokenizer_files(cfg: TrainConfig) -> dict[str, bytes]:
    """The tokenizer files of the model being trained, to save next to its weights."""
    import tempfile

    from phantom_ray.processing import load_tokenizer

    tok = load_tokenizer(cfg.model.init_from or cfg.model.preset)
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {name: open(os.path.join(d, name), "rb").read() for name in os.listdir(d)
                if os.path.isfile(os.path.join(d, name))}


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
