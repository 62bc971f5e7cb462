"""Beam search for :class:`~phantom_ray.model.PhantomForCausalLM`, next to its greedy/sampled
``generate`` (``modeling.py``): the same cache, step API and stop-token conventions.

Beam search (``num_beams > 1``; what the original eval harness used with 3 beams) runs one prefill
per prompt batch, then one step per token on ``B * num_beams`` rows; ``cache.index_select``
reorders the KV and phantom states when beams are reselected. Batch-invariant: every prompt's beams
are scored on their own rows.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def beam_search(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
                *, num_beams: int, max_new_tokens: int, stop_token_ids: list[int], pad_token_id: int,
                length_penalty: float = 1.0) -> list[tuple[list[int], str]]:
    """Beam search per prompt (Hugging Face semantics with ``early_stopping=False``): a
    hypothesis ends at a stop token; its score is sum(logprob) / length ** length_penalty; a
    prompt is done once it holds ``num_beams`` finished hypotheses that no live beam can beat."""
    K = num_beams
    ids, mask = input_ids, attention_mask
    B, L = ids.shape
    dev = ids.device
    stops = set(stop_token_ids)
    pad = pad_token_id
    cache = model.new_cache(L + max_new_tokens)
    out = model(ids, mask, pixel_values, cache=cache, logits_to_keep=1)
    # (B*K) rows, beam k of prompt b at row b*K + k; only beam 0 is live at first
    cache.index_select(torch.arange(B, device=dev).repeat_interleave(K))
    logits = out.logits[:, -1].repeat_interleave(K, dim=0)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    tokens: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    finished: list[list[tuple[float, list[int], str]]] = [[] for _ in range(B)]
    done = [False] * B
    lp = length_penalty
    ones = torch.ones(B * K, 1, dtype=mask.dtype, device=dev)
    for step in range(max_new_tokens):
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        V = logp.shape[-1]
        total = (scores.reshape(-1, 1) + logp).reshape(B, K * V)
        top_scores, top_idx = total.topk(2 * K, dim=1)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
        next_rows, next_tok, next_scores, next_tokens = [], [], [], []
        cur_len = step + 1
        for b in range(B):
            if done[b]:  # keep the rows busy with a harmless continuation
                next_rows += [b * K + k for k in range(K)]
                next_tok += [pad] * K
                next_scores += [float("-inf")] * K
                next_tokens += [tokens[b][k] for k in range(K)]
                continue
            chosen = 0
            for rank, (sc, flat) in enumerate(zip(top_scores[b], top_idx[b])):
                if sc == float("-inf"):
                    break
                beam, tok = divmod(flat, V)
                seq = tokens[b][beam] + [tok]
                if tok in stops:
                    if rank < K:  # as HF: only candidates ranked within the beam width may finish
                        finished[b].append((sc / (cur_len ** lp), seq, "stop"))
                    continue
                next_rows.append(b * K + beam)
                next_tok.append(tok)
                next_scores.append(sc)
                next_tokens.append(seq)
                chosen += 1
                if chosen == K:
                    break
            while chosen < K:  # fewer live candidates than beams (tiny vocab): pad with dead beams
                next_rows.append(b * K)
                next_tok.append(pad)
                next_scores.append(float("-inf"))
                next_tokens.append(tokens[b][0])
                chosen += 1
            best_live = max(next_scores[-K:])
            if best_live == float("-inf"):
                done[b] = True
            elif len(finished[b]) >= K:
                finished[b].sort(key=lambda h: h[0], reverse=True)
                del finished[b][K:]
                if best_live / (cur_len ** lp) <= finished[b][-1][0]:
                    done[b] = True
        if all(done):
            break
        tokens = [next_tokens[b * K:(b + 1) * K] for b in range(B)]
        scores = torch.tensor(next_scores, device=dev).reshape(B, K)
        if step == max_new_tokens - 1:
            break
        cache.index_select(torch.tensor(next_rows, device=dev))
        out = model(torch.tensor(next_tok, device=dev)[:, None], ones, cache=cache, logits_to_keep=1)
        logits = out.logits[:, -1]
    results = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:  # ran out of tokens: live beams compete as "length" hypotheses
            for k in range(K):
                sc = float(scores[b, k])
                if sc > float("-inf") and tokens[b][k]:
                    hyps.append((sc / (len(tokens[b][k]) ** lp), tokens[b][k], "length"))
        if not hyps:
            results.append(([], "length"))
            continue
        best = max(hyps, key=lambda h: h[0])
        results.append((best[1], best[2]))
    return results
