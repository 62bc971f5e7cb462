"""The memory-lean loss (LM head fused into the chunked log-softmax) under real DeepSpeed ZeRO-3.

One process, gloo, the recipe as training runs it, every parameter partitioned
(``stage3_param_persistence_threshold: 0``, so the LM head weight is gathered only inside its
module's forward and backward): the fused head gives the same loss and the same gradients as the
plain loss (model logits, then the chunked log-softmax), and as ZeRO-0. The 2-worker ZeRO-3 curve
is in test_train_ray.py::test_zero2_and_zero3_match_single_process_loss_curve."""

from __future__ import annotations

import pytest
import torch

from train_helpers import pair_batches, tiny_cfg

torch.set_num_threads(1)

PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def _loss_and_grads(cfg, batch):
    from deepspeed.utils import safe_get_full_grad

    from phantom_ray.train.recipe import PhantomRecipe

    rec = PhantomRecipe(cfg).setup(1)
    rec.engine.train()
    if cfg.deepspeed.zero_stage == 3:  # the head weight really is partitioned outside its module
        head = rec.model.language_model.head.weight
        assert head.numel() == 0 and tuple(head.ds_shape) == (rec.model.config.llm_config.vocab_size,
                                                               rec.model.config.llm_config.hidden_size)
    result = rec.forward_loss(batch)
    rec.engine.backward(result.loss)
    grads = {}
    for n, p in rec.model.named_parameters():
        g = safe_get_full_grad(p) if cfg.deepspeed.zero_stage == 3 else p.grad
        grads[n] = None if g is None else g.detach().clone().float()
    return result.metrics(), grads


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fused_head_loss_under_zero3_equals_plain_loss(tmp_path, packed):
    batch = pair_batches(1, batch_size=3, seed=7)[0]
    if packed:
        from phantom_ray.model import PhantomConfig
        from phantom_ray.processing import PhantomProcessor, load_tokenizer

        from train_helpers import po_pairs

        pc = PhantomConfig.from_preset("tiny-qwen2")
        proc = PhantomProcessor(pc, load_tokenizer("tiny-qwen2", pc), max_length=256)
        batch = proc.pack_pairs(po_pairs(proc, 3, seed=2), 400)

    def cfg(stage, fused):
        return tiny_cfg(tmp_path, recipe={"step": 2}, loss={"fused_head": fused, "chunk_tokens": 5},
                        deepspeed={"zero_stage": stage, "extra": PARTITION_ALL if stage == 3 else {}})

    lean_m, lean_g = _loss_and_grads(cfg(3, True), batch)
    plain_m, plain_g = _loss_and_grads(cfg(3, False), batch)
    ref_m, ref_g = _loss_and_grads(cfg(0, False), batch)
    for k in ref_m:
        assert lean_m[k] == pytest.approx(plain_m[k], rel=1e-5, abs=1e-6), k
        assert lean_m[k] == pytest.approx(ref_m[k], rel=1e-5, abs=1e-6), k
    head = "language_model.lm_head.weight"
    assert lean_g[head] is not None and lean_g[head].abs().sum() > 0  # the head's gradient reached it
    for n, g in ref_g.items():
        assert lean_g[n] is not None and plain_g[n] is not None, n
        scale = g.abs().max().item() + 1e-12
        assert (lean_g[n] - plain_g[n]).abs().max().item() <= 1e-4 * scale + 1e-7, n
        assert (lean_g[n] - g).abs().max().item() <= 1e-4 * scale + 1e-7, n
