"""Training objectives on model logits (pure torch): SFT, Phantom Optimization (PO) and DPO.

See docs/phantom.md#phantom-optimization. For an answer y (tokens whose label is not -100) of a prompt x:

* ``l(y) = sum_t log p(y_t | x, y_<t)`` (:func:`sequence_logps`), ``|y|`` its token count;
* PO (SimPO form, reference-free): ``r(y) = beta / |y| * l(y)`` and
  ``L_pref = -log sigmoid(r(y_c) - r(y_r) - gamma)``;
  ``L_PO = sft_weight * L_SFT(y_c) + pref_weight * L_pref`` where ``L_SFT`` is the token-mean CE
  of the chosen answers;
* DPO: ``L_pref = -log sigmoid(beta * ((l_c - l_c_ref) - (l_r - l_r_ref)))`` with reference
  log-probs computed beforehand (so only the policy is in memory while training).

A PO batch holds 2B rows: chosen 0..B-1, rejected B..2B-1 (``processor.collate_pairs``). Rows
without a rejected answer (``has_rejected`` False) contribute only to the SFT term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of answer-token log-probs and answer-token counts.

    logits (B, L, V) predict token t+1 at position t; labels (B, L) with ``ignore_index`` where not
    supervised. Returns ``(logp_sum (B,), n_tokens (B,))`` in float32.
    """
    logits = logits[:, :-1].float()                          # (B, L-1, V)
    target = labels[:, 1:]                                   # (B, L-1)
    mask = target != ignore_index
    safe = target.masked_fill(~mask, 0)
    token_logps = torch.gather(logits.log_softmax(-1), 2, safe[..., None]).squeeze(-1)  # (B, L-1)
    token_logps = token_logps * mask
    return token_logps.sum(-1), mask.sum(-1).float()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Token-mean cross-entropy over every supervised token of the batch."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=ignore_index)


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


def preference_loss(logits: torch.Tensor, labels: torch.Tensor, *, kind: str = "po", beta: float = 2.0,
                    gamma: float = 1.0, pref_weight: float = 1.0, sft_weight: float = 1.0,
                    has_rejected: torch.Tensor | None = None, ref_chosen_logps: torch.Tensor | None = None,
                    ref_rejected_logps: torch.Tensor | None = None, ignore_index: int = -100) -> LossOutput:
    """PO / DPO loss on a pair batch of 2B rows (chosen first), or SFT on a plain batch.

    ``kind="sft"`` or unpaired rows (``has_rejected`` False) give the SFT term only, on the chosen rows.
    For pairs, ``labels`` of rows B..2B-1 are the rejected answers' labels.
    """
    zero = logits.new_zeros(())
    if has_rejected is None:
        sft = sft_loss(logits, labels, ignore_index)
        return LossOutput(sft_weight * sft, sft, zero, zero, zero, 0)
    B = has_rejected.shape[0]
    if logits.shape[0] != 2 * B:
        raise ValueError(f"pair batch has {logits.shape[0]} rows but has_rejected has {B} entries (expected 2B rows)")
    sft = sft_loss(logits[:B], labels[:B], ignore_index)  # the rejected answers are never imitated
    pairs = has_rejected.bool()
    n_pairs = int(pairs.sum())
    if kind == "sft" or n_pairs == 0:
        return LossOutput(sft_weight * sft, sft, zero, zero, zero, 0)
    logps, lens = sequence_logps(logits, labels, ignore_index)
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
