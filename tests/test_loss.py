"""Memory-lean losses: the chunked log-prob paths (from logits, and fused from hidden states + the
LM-head weight) give the same losses and gradients as the plain full-vocabulary fp32 log-softmax."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phantom_ray.train.loss import preference_loss, target_logps

torch.set_num_threads(1)


def _reference(logits, labels, kind, beta=2.0, gamma=0.5, w_pref=0.7, w_sft=1.0, has_rejected=None, ref=None):
    """The previous implementation, written out: full (B, L-1, V) fp32 log-softmax."""
    lf = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 here: exact compare)
    tgt = labels[:, 1:]
    mask = tgt != -100
    lp = torch.gather(lf.log_softmax(-1), 2, tgt.masked_fill(~mask, 0)[..., None]).squeeze(-1) * mask
    sums, lens = lp.sum(-1), mask.sum(-1).float()
    B = labels.shape[0] // 2
    sft = F.cross_entropy(lf[:B].reshape(-1, lf.shape[-1]), tgt[:B].reshape(-1), ignore_index=-100)
    if kind == "sft":
        return w_sft * sft
    p = has_rejected
    if kind == "po":
        margin = beta * sums[:B][p] / lens[:B][p] - beta * sums[B:][p] / lens[B:][p]
        pref = -F.logsigmoid(margin - gamma).mean()
    else:
        margin = beta * ((sums[:B][p] - ref[0][p]) - (sums[B:][p] - ref[1][p]))
        pref = -F.logsigmoid(margin).mean()
    return w_sft * sft + w_pref * pref


def _batch(B=3, L=17, V=50, C=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, L, C, generator=g, dtype=torch.float64)
    weight = torch.randn(V, C, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2 * B, L), generator=g)
    for r in range(2 * B):  # a prompt of varying length, then the answer, then padding
        p, e = 2 + r, L - (r % 3)
        labels[r, :p] = -100
        labels[r, e:] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("kind", ["po", "sft", "dpo"])
@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_chunked_losses_and_gradients_equal_the_full_log_softmax(kind, source):
    hidden, weight, labels = _batch()
    B = labels.shape[0] // 2
    has_rejected = torch.tensor([True, False, True])
    ref = (torch.randn(B, dtype=torch.float64), torch.randn(B, dtype=torch.float64))

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expect = _reference(h1 @ w1.t(), labels, kind, has_rejected=has_rejected, ref=ref)
    expect.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    kw = dict(kind=kind, beta=2.0, gamma=0.5, pref_weight=0.7, sft_weight=1.0, has_rejected=has_rejected,
              ref_chosen_logps=ref[0], ref_rejected_logps=ref[1], chunk=5)  # several chunks per batch
    if source == "logits":
        got = preference_loss(h2 @ w2.t(), labels, **kw)
    else:
        got = preference_loss(None, labels, hidden=h2, head_weight=w2, **kw)
    got.loss.backward()
    assert got.loss.item() == pytest.approx(expect.item(), rel=1e-10)
    assert torch.allclose(h2.grad, h1.grad, atol=1e-9), (h2.grad - h1.grad).abs().max()
    assert torch.allclose(w2.grad, w1.grad, atol=1e-9), (w2.grad - w1.grad).abs().max()


def test_fp32_head_matches_within_fp32_tolerance():
    hidden, weight, labels = _batch(V=300, C=16, seed=1)
    hidden, weight = hidden.float(), weight.float()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lf = (h1 @ w1.t())[:, :-1]
    tgt = labels[:, 1:]
    F.cross_entropy(lf.reshape(-1, 300), tgt.reshape(-1), ignore_index=-100, reduction="sum").backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, mask = target_logps(labels, hidden=h2, head_weight=w2, chunk=7)
    (-lp.sum()).backward()
    assert torch.allclose(h2.grad, h1.grad, atol=1e-4, rtol=1e-4)
    assert torch.allclose(w2.grad, w1.grad, atol=1e-4, rtol=1e-4)


def test_no_supervised_token_gives_zero_loss_and_gradient():
    hidden, weight, labels = _batch()
    labels[:] = -100
    h = hidden.clone().requires_grad_()
    out = preference_loss(None, labels, hidden=h, head_weight=weight)
    out.loss.backward()
    assert out.loss.item() == 0.0 and float(h.grad.abs().sum()) == 0.0
