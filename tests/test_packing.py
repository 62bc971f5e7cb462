"""Sequence packing: several samples per row, attention confined to each sample, positions restarting
per sample, and each sample's own phantom token. A packed batch must give every sample the same
log-probs and the same parameter gradients as running the samples one by one."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_processor
from train_helpers import po_pairs

from phantom_ray.model import PhantomForCausalLM
from phantom_ray.processing.processor import plan_rows
from phantom_ray.train.loss import segment_sums, target_logps

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def proc():
    return tiny_processor("tiny-qwen2", max_length=512)


def _model(attn):
    torch.manual_seed(0)
    # eta 1: the phantom branch changes the outputs visibly, so a wrong phantom token would show
    return PhantomForCausalLM.from_preset("tiny-qwen2", attn_implementation=attn, phantom_eta=1.0).double()


def _per_sample(model, batch, packed):
    pv = batch["pixel_values"].double() if batch.get("pixel_values") is not None else None
    kw = dict(segment_ids=batch["segment_ids"], position_ids=batch["position_ids"]) if packed else {}
    out = model(batch["input_ids"], batch["attention_mask"], pv, image_repeat=batch.get("image_repeat", 1),
                phantom_index=batch.get("phantom_index"), return_hidden=True, **kw)
    lp, mask = target_logps(batch["labels"], hidden=out.hidden_states, head_weight=model.language_model.head.weight,
                            chunk=16)
    return segment_sums(lp, mask, batch["sample_index"] if packed else None,
                        batch["num_samples"] if packed else None)


def test_plan_rows_first_fit_decreasing():
    rows = plan_rows([5, 9, 3, 4, 12], 12)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert rows == [[4], [1, 2], [0, 3]]
    lengths = [5, 9, 3, 4, 12]
    assert all(sum(lengths[i] for i in r) <= 12 for r in rows)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_pairs_equal_one_by_one_losses_and_gradients(proc, attn):
    pairs = po_pairs(proc, 5)
    B = len(pairs)
    lens = [max(len(p.chosen), len(p.rejected)) for p in pairs]
    budget = sorted(lens)[-1] + sorted(lens)[0] + 1  # at least two pairs share a row
    packed = proc.pack_pairs(pairs, budget)
    R = packed["input_ids"].shape[0] // 2
    assert R < B and packed["num_samples"] == 2 * B
    # chosen and rejected rows hold the same pairs in the same order
    c_ids = [torch.unique_consecutive(r[r >= 0]).tolist() for r in packed["sample_index"][:R]]
    r_ids = [[k - B for k in torch.unique_consecutive(r[r >= 0]).tolist()] for r in packed["sample_index"][R:]]
    assert c_ids == r_ids

    weights = torch.randn(2 * B, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model = _model(attn)
    lp_packed, n_packed = _per_sample(model, packed, packed=True)
    (weights * lp_packed).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    lp_single, n_single = [], []
    for k, pair in enumerate(pairs):
        lp, n = _per_sample(model, proc.collate_pairs([pair]), packed=False)  # rows: chosen, rejected
        (weights[k] * lp[0] + weights[B + k] * lp[1]).backward()
        lp_single.append(lp.detach())
        n_single.append(n)
    lp_single = torch.stack(lp_single)  # (B, 2)
    n_single = torch.stack(n_single)
    assert torch.equal(n_packed, torch.cat([n_single[:, 0], n_single[:, 1]]))
    assert torch.allclose(lp_packed.detach(), torch.cat([lp_single[:, 0], lp_single[:, 1]]), atol=1e-9)
    for name, p in model.named_parameters():
        if name in g_packed:
            assert torch.allclose(g_packed[name], p.grad, atol=1e-9), name


def test_packed_single_sample_equals_unpacked(proc):
    pair = po_pairs(proc, 1, seed=3)[0]
    model = _model("sdpa")
    packed = proc.pack([pair.chosen], 10_000)
    plain = proc.collate([pair.chosen])
    pv = plain["pixel_values"].double()
    a = model(plain["input_ids"], plain["attention_mask"], pv).logits
    b = model(packed["input_ids"], packed["attention_mask"], packed["pixel_values"].double(),
              segment_ids=packed["segment_ids"]).logits  # position_ids derived from segment_ids
    assert torch.equal(packed["input_ids"], plain["input_ids"])
    assert torch.allclose(a, b, atol=1e-10)


def test_packed_rows_keep_each_sample_own_phantom_token(proc):
    """Changing one sample's first token changes only that sample's outputs in a packed row."""
    pairs = po_pairs(proc, 2, seed=5)
    model = _model("eager")
    batch = proc.pack([p.chosen for p in pairs], 10_000)
    assert batch["input_ids"].shape[0] == 1 and int(batch["segment_ids"].max()) == 1
    out = model(batch["input_ids"], None, batch["pixel_values"].double(), segment_ids=batch["segment_ids"]).logits
    ids = batch["input_ids"].clone()
    second = int((batch["segment_ids"][0] == 1).nonzero()[0])
    ids[0, second] = (ids[0, second] + 1) % model.config.llm_config.vocab_size
    out2 = model(ids, None, batch["pixel_values"].double(), segment_ids=batch["segment_ids"]).logits
    assert torch.equal(out[0, :second], out2[0, :second])  # the first sample never sees the second
    assert not torch.allclose(out[0, second:], out2[0, second:])
