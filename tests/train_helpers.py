"""Shared helpers of the training tests: tiny configs, synthetic pair batches, a packed corpus."""

from __future__ import annotations

import os
import random


def tiny_cfg(tmp_path, **sections):
    from phantom_ray.train.config import TrainConfig

    d = {"data": {"shards": str(tmp_path / "none"), "task": "po", "batch_size": 4},
         "model": {"preset": "tiny-qwen2", "phantom_eta": 1.0},
         "optim": {"lr": 1e-2, "grad_clip": 1.0},
         "deepspeed": {"zero_stage": 0},
         "run": {"storage_path": str(tmp_path / "runs"), "seed": 0}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return TrainConfig.from_dict(d)


def pair_batches(n_batches: int, batch_size: int = 4, seed: int = 0, task: str = "po"):
    """Collated PO (or SFT) batches of synthetic colour questions, built with the tiny processor."""
    from phantom_ray.data.synth import QUESTIONS, _wrong, random_image
    from phantom_ray.processing import PhantomProcessor, load_tokenizer
    from phantom_ray.model import PhantomConfig
    from phantom_ray.processing.images import load_image

    cfg = PhantomConfig.from_preset("tiny-qwen2")
    proc = PhantomProcessor(cfg, load_tokenizer("tiny-qwen2", cfg), max_length=256)
    rng = random.Random(seed)
    out = []
    for b in range(n_batches):
        pairs = []
        for i in range(batch_size):
            img = random_image(rng, 32)
            right = img.answer("colour")
            pair = proc.encode_triple(QUESTIONS["colour"], right, _wrong(rng, "colour", right),
                                      image=load_image(img.png))
            pairs.append(pair)
        if task == "po":
            batch = proc.collate_pairs(pairs)
        else:
            batch = proc.collate([p.chosen for p in pairs])
        batch["sample_id"] = [f"s{seed}-{b}-{i}" for i in range(batch_size)]
        out.append(batch)
    return out


class PauseAtStep:
    """Test-only step callback for ``run_training(step_callbacks=[...])``: at ``step`` on ``rank``,
    write this worker's PID to ``<pid_dir>/rank<r>.pid`` and sleep, so the test can kill it between
    checkpoints. Only the first attempt pauses (the marker file exists afterwards)."""

    def __init__(self, pid_dir: str, step: int, rank: int, pause_s: float = 60.0):
        self.pid_dir, self.step, self.rank, self.pause_s = pid_dir, step, rank, pause_s

    def __call__(self, rank: int, step: int) -> None:
        import time

        if step != self.step or rank != self.rank:
            return
        marker = os.path.join(self.pid_dir, f"rank{rank}.pid")
        if os.path.exists(marker):
            return
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        time.sleep(self.pause_s)


def po_pairs(proc, n, seed=0):
    """``n`` encoded PO triples of the shapes corpus with uneven answer lengths (packing and loss tests)."""
    from phantom_ray.data.synth import QUESTIONS, _wrong, random_image
    from phantom_ray.processing.images import load_image

    rng = random.Random(seed)
    out = []
    for i in range(n):
        img = random_image(rng, 32)
        q = ["colour", "shape", "count"][i % 3]
        right = img.answer(q)
        chosen = right + " indeed" * (i % 4)  # different answer lengths, so rows are uneven
        out.append(proc.encode_triple(QUESTIONS[q], chosen, _wrong(rng, q, right), image=load_image(img.png)))
    return out
