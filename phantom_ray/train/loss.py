"""Training objectives on model logits (pure torch): SFT, Phantom Optimization (PO) and DPO.

See docs/phantom.md#phantom-optimization. For an answer y (tokens whose label is not -100) of a prompt x:

* ``l(y) = sum_t log p(y_t | x, y_<t)`` (:func:`sequence_logps`), ``|y|`` its token count;
* PO (SimPO form, reference-free): ``r(y) = beta / |y| * l(y)`` and
  ``L_pref = -log sigmoid(r(y_c) - r(y_r) - gamma)``;
  ``L_PO = sft_weight * L_SFT(y_c) + pref_weight * L_pref`` where ``L_SFT`` is the token-mean CE
  of the chosen answers;
* DPO: ``L_pref = -log sigmoid(beta * ((l_c - l_c_ref) - (l_r - l_r_ref)))`` with reference
  log-probs computed beforehand (so only the policy is in memory while training).

A PO batch holds 2B rows: chosen 0..B-1, rejected B..2B-1 (``processor.collate_pairs``), or, packed
(``processor.pack_pairs``), 2B samples laid out in rows with ``sample_index``. Rows without a
rejected answer (``has_rejected`` False) contribute only to the SFT term.

Memory: log-probs are taken only at supervised positions, ``chunk`` positions at a time, by custom
autograd functions (:func:`target_logps`); from the final hidden states and the LM-head weight no
(tokens x vocab) tensor is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of answer-token log-probs and answer-token counts.

    logits (B, L, V) predict token t+1 at position t; labels (B, L) with ``ignore_index`` where not
    supervised. Returns ``(logp_sum (B,), n_tokens (B,))`` in float32. Memory-lean: the fp32
    log-softmax is formed ``chunk`` positions at a time (:func:`target_logps`).
    """
    token_lp, mask = target_logps(labels, logits=logits, ignore_index=ignore_index)
    return token_lp.sum(-1), mask.sum(-1).float()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Token-mean cross-entropy over every supervised token of the batch."""
    token_lp, mask = target_logps(labels, logits=logits, ignore_index=ignore_index)
    return -token_lp.sum() / mask.sum().clamp(min=1)


# ---- memory-lean target log-probs ---------------------------------------------------------------------
# The plain way, ``logits.float().log_softmax(-1).gather(...)``, holds a (tokens x vocab) fp32 tensor
# for the whole batch (1.2 GB per 2,048-token sequence at Qwen2's 151,655 tokens) plus its gradient.
# Two custom autograd functions keep only ``chunk`` rows of it alive at a time:
# * _ChunkedLogitsLogp: from logits the model already returned; saves the per-token log-sum-exp and
#   rebuilds softmax chunk by chunk in backward (the logits' own gradient is the only full tensor);
# * _ChunkedLinearLogp: from the final hidden states and the LM-head weight (the fused
#   linear + cross-entropy of Liger/Apple CCE): no (tokens x vocab) tensor exists at all, in forward
#   or backward; the head GEMM is recomputed per chunk in backward.

DEFAULT_CHUNK = 256  # (256, 151,655) fp32 = 155 MB per chunk; big enough GEMMs for a GPU


class _ChunkedLogitsLogp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, pos, target, chunk):  # logits (M, V) any float dtype; pos, target (N,)
        N = pos.shape[0]
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least (fp64 stays fp64 in tests)
        lse = torch.empty(N, dtype=acc, device=logits.device)
        tgt = torch.empty(N, dtype=acc, device=logits.device)
        for s in range(0, N, chunk):
            x = logits[pos[s:s + chunk]].to(acc)
            lse[s:s + chunk] = torch.logsumexp(x, -1)
            tgt[s:s + chunk] = x.gather(1, target[s:s + chunk, None])[:, 0]
        ctx.save_for_backward(logits, pos, target, lse)
        ctx.chunk = chunk
        return tgt - lse

    @staticmethod
    def backward(ctx, grad):  # d logp_t / d x = onehot(t) - softmax(x)
        logits, pos, target, lse = ctx.saved_tensors
        out = torch.zeros_like(logits)
        for s in range(0, pos.shape[0], ctx.chunk):
            e = s + ctx.chunk
            g = grad[s:e, None].to(lse.dtype)
            d = logits[pos[s:e]].to(lse.dtype)  # a fresh (chunk, V) tensor: everything below in place
            d.sub_(lse[s:e, None]).exp_().mul_(-g)  # -g * softmax
            d.scatter_add_(1, target[s:e, None], g)
            out[pos[s:e]] = d.to(out.dtype)
        return out, None, None, None


class _ChunkedLinearLogp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, pos, target, chunk):  # hidden (M, C), weight (V, C); pos, target (N,)
        N = pos.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        tgt = torch.empty(N, dtype=acc, device=hidden.device)
        for s in range(0, N, chunk):
            x = (hidden[pos[s:s + chunk]] @ weight.t()).to(acc)  # the head in the model's dtype, then fp32
            lse[s:s + chunk] = torch.logsumexp(x, -1)
            tgt[s:s + chunk] = x.gather(1, target[s:s + chunk, None])[:, 0]
        ctx.save_for_backward(hidden, weight, pos, target, lse)
        ctx.chunk = chunk
        return tgt - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, pos, target, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        for s in range(0, pos.shape[0], ctx.chunk):
            e = s + ctx.chunk
            h = hidden[pos[s:e]]
            g = grad[s:e, None].to(lse.dtype)
            d = (h @ weight.t()).to(lse.dtype)  # recomputed head chunk; everything below in place
            d.sub_(lse[s:e, None]).exp_().mul_(-g)  # -g * softmax
            d.scatter_add_(1, target[s:e, None], g)
            d = d.to(weight.dtype)
            if need_h:
                gh[pos[s:e]] = d @ weight
            if need_w:
                if d.dtype == gw.dtype:
                    gw.addmm_(d.t(), h)  # in place: no second (V, C) temporary per chunk
                else:
                    gw += (d.t() @ h).to(gw.dtype)
        return gh, (gw.to(weight.dtype) if need_w else None), None, None, None


def target_logps(labels: torch.Tensor, *, logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                 head_weight: torch.Tensor | None = None, head=None, ignore_index: int = -100,
                 chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every next-token target: ``(token_logps (R, L-1) fp32, 0 where unsupervised;
    mask (R, L-1) bool)``. Position t predicts ``labels[:, t+1]``.

    Give either ``logits`` (R, L, V), or ``hidden`` (R, L, C) + the LM head: ``head`` (the model's
    :class:`~phantom_ray.model.llm.LMHead` module, which runs the fused computation inside its own
    forward, so DeepSpeed ZeRO-3 gathers its partitioned weight for forward and backward) or
    ``head_weight`` (V, C) (a weight that is whole where it is read: no ZeRO-3). Both are the
    leanest form, see above. Only supervised positions are computed at all.
    """
    R, L = labels.shape
    target = labels[:, 1:]
    mask = target != ignore_index
    rows, cols = mask.nonzero(as_tuple=True)
    pos = rows * L + cols  # flat index of the predicting position in the (R*L, ...) view
    t = target[rows, cols]
    if logits is not None:
        lp = _ChunkedLogitsLogp.apply(logits.reshape(R * L, -1), pos, t, chunk)
    elif hidden is not None and head is not None:
        lp = head(hidden.reshape(R * L, -1), fused=lambda h, w: _ChunkedLinearLogp.apply(h, w, pos, t, chunk))
    elif hidden is not None and head_weight is not None:
        lp = _ChunkedLinearLogp.apply(hidden.reshape(R * L, -1), head_weight, pos, t, chunk)
    else:
        raise ValueError("target_logps needs logits, or hidden and the LM head (head or head_weight)")
    out = torch.zeros(target.shape, dtype=lp.dtype, device=labels.device).index_put((rows, cols), lp)
    return out, mask


def segment_sums(token_logps: torch.Tensor, mask: torch.Tensor, sample_index: torch.Tensor | None,
                 num_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (logp sum, supervised token count). ``sample_index`` (R, L) gives each position's
    sample in a packed batch (-1 on padding); None means one sample per row."""
    if sample_index is None:
        return token_logps.sum(-1), mask.sum(-1).float()
    idx = sample_index[:, 1:]  # the target token's sample: a boundary position predicts the next
    keep = mask & (idx >= 0)   # sample's first token, which is never supervised (prompt)
    n = int(num_samples if num_samples is not None else int(sample_index.max()) + 1)
    flat = idx.clamp(min=0).reshape(-1)
    sums = token_logps.new_zeros(n).index_add(0, flat, (token_logps * keep).reshape(-1))
    counts = token_logps.new_zeros(n, dtype=torch.float32).index_add(0, flat, keep.reshape(-1).float())
    return sums, counts


@dataclass
class LossOutput:
    loss: torch.Tensor
    sft_loss: torch.Tensor
    pref_loss: torch.Tensor          # 0 when no row has a rejected answer
    reward_margin: torch.Tensor      # mean of r(y_c) - r(y_r) over pairs (0 without pairs)
    pref_accuracy: torch.Tensor      # fraction of pairs with r(y_c) > r(y_r)
    num_pairs: int

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach()), "sft_loss": float(self.sft_loss.detach()),
                "pref_loss": float(self.pref_loss.detach()), "reward_margin": float(self.reward_margin.detach()),
                "pref_accuracy": float(self.pref_accuracy.detach())}


def po_preference(chosen_logps, chosen_len, rejected_logps, rejected_len, beta: float, gamma: float):
    """SimPO term per pair: (loss (B,), margin r_c - r_r (B,))."""
    margin = beta * chosen_logps / chosen_len.clamp(min=1) - beta * rejected_logps / rejected_len.clamp(min=1)
    return -F.logsigmoid(margin - gamma), margin


def dpo_preference(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """DPO term per pair: (loss (B,), implicit reward margin (B,))."""
    margin = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    return -F.logsigmoid(margin), margin


def preference_loss(logits: torch.Tensor | None, labels: torch.Tensor, *, kind: str = "po", beta: float = 2.0,
                    gamma: float = 1.0, pref_weight: float = 1.0, sft_weight: float = 1.0,
                    has_rejected: torch.Tensor | None = None, ref_chosen_logps: torch.Tensor | None = None,
                    ref_rejected_logps: torch.Tensor | None = None, ignore_index: int = -100,
                    hidden: torch.Tensor | None = None, head_weight: torch.Tensor | None = None, head=None,
                    sample_index: torch.Tensor | None = None, num_samples: int | None = None,
                    chunk: int = DEFAULT_CHUNK) -> LossOutput:
    """PO / DPO loss on a pair batch (chosen first), or SFT on a plain batch.

    Unpacked: 2B rows, rows B..2B-1 hold the rejected answers. Packed (``sample_index`` (R, L), the
    sample of every position, -1 on padding, ``num_samples`` = 2B): samples 0..B-1 are the chosen
    answers and B+k is the rejected answer of pair k. ``kind="sft"`` or unpaired rows
    (``has_rejected`` False) give the SFT term only, on the chosen answers. Pass ``logits``, or
    ``hidden`` + ``head`` (or ``head_weight``) for the fused head + log-softmax that never forms the logits.
    """
    token_lp, mask = target_logps(labels, logits=logits, hidden=hidden, head_weight=head_weight, head=head,
                                  ignore_index=ignore_index, chunk=chunk)
    zero = token_lp.new_zeros(())
    if has_rejected is None:
        sft = -token_lp.sum() / mask.sum().clamp(min=1)
        return LossOutput(sft_weight * sft, sft, zero, zero, zero, 0)
    B = has_rejected.shape[0]
    n = num_samples if sample_index is not None else labels.shape[0]
    if n != 2 * B:
        raise ValueError(f"pair batch has {n} {'samples' if sample_index is not None else 'rows'} but has_rejected "
                         f"has {B} entries (expected 2B)")
    logps, lens = segment_sums(token_lp, mask, sample_index, n)
    sft = -logps[:B].sum() / lens[:B].sum().clamp(min=1)  # token mean; the rejected answers are never imitated
    pairs = has_rejected.bool()
    n_pairs = int(pairs.sum())
    if kind == "sft" or n_pairs == 0:
        return LossOutput(sft_weight * sft, sft, zero, zero, zero, 0)
    c_lp, r_lp, c_len, r_len = logps[:B][pairs], logps[B:][pairs], lens[:B][pairs], lens[B:][pairs]
    if kind == "po":
        per_pair, margin = po_preference(c_lp, c_len, r_lp, r_len, beta, gamma)
    elif kind == "dpo":
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("loss.kind='dpo' needs reference log-probs (ref_chosen_logps / ref_rejected_logps)")
        per_pair, margin = dpo_preference(c_lp, r_lp, ref_chosen_logps.to(c_lp)[pairs], ref_rejected_logps.to(c_lp)[pairs],
                                          beta)
    else:
        raise ValueError(f"unknown loss kind {kind!r}")
    pref = per_pair.mean()
    return LossOutput(sft_weight * sft + pref_weight * pref, sft, pref, margin.detach().mean(),
                      (margin.detach() > 0).float().mean(), n_pairs)
