"""Phantom states per sequence on vLLM's flattened steps (pure torch: no vLLM import, unit-tested).

A sequence's phantom states are those of its first token, and depend on that token id alone
(docs/phantom.md#phantom-token). :class:`PhantomStateTable` keeps them per distinct first-token id,
computed once; :func:`first_tokens` finds, for every token of a vLLM step, its sequence and that
sequence's first token from the step's attention metadata, vectorised:

* ``query_start_loc`` (R+1,) gives each token's sequence (a ``searchsorted``, no host sync);
* a sequence with nothing computed yet (``seq_lens - query lengths == 0``) has its first token in
  this step: its first scheduled token (position 0);
* any other sequence is looked up through the KV block that holds its last computed token
  (``block_table``) in ``block_first``, a table that records for every KV block written the first
  token of the sequence that wrote it (updated here from ``slot_mapping`` every step).

Why the block lookup is exact: under prefix caching a block is shared only by sequences whose tokens
up to and including that block are equal (vLLM's block hashes chain from the first block), so they
have the same first token; a block freed and reused is recorded again when it is rewritten; the
block of a sequence's last computed token is never one a sliding window has dropped; a preempted
sequence is recomputed from position 0. Not covered: KV blocks that enter the cache other than
through the model's forward (KV connectors / offloading that load blocks computed elsewhere).
"""

from __future__ import annotations

import torch

from phantom_ray.model.cache import PhantomStates


def first_tokens(ids: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                 block_table: torch.Tensor, slot_mapping: torch.Tensor, block_size: int,
                 block_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one step of N tokens (``ids`` (N,)) of R sequences: (sequence index of each token (N,),
    first token id of each token's sequence (N,), first token id per sequence (R,)).

    ``block_first`` (num_blocks + 1,) long is read for sequences with computed context and then
    updated in place for every block this step writes (its last entry is a sink for padding slots,
    ``slot_mapping`` < 0)."""
    dev = ids.device
    N = ids.shape[0]
    qsl = query_start_loc.to(dev).long()
    R = qsl.numel() - 1
    computed = seq_lens[:R].to(dev).long() - (qsl[1:] - qsl[:-1])  # tokens already in the KV cache
    blocks = block_table[:R].to(dev).long()
    last_block = blocks.gather(1, ((computed - 1).clamp(min=0) // block_size)[:, None])[:, 0]
    in_step = ids[qsl[:-1].clamp(max=max(N - 1, 0))]
    first_per_seq = torch.where(computed == 0, in_step, block_first[last_block])
    seq = torch.searchsorted(qsl[1:], torch.arange(N, device=dev), right=True).clamp(max=max(R - 1, 0))
    first = first_per_seq[seq]
    slots = slot_mapping[:N].to(dev).long()
    sink = block_first.numel() - 1
    block_first[torch.where(slots >= 0, slots // block_size, torch.full_like(slots, sink))] = first
    return seq, first, first_per_seq


class TokenStates:
    """``phantom[layer]`` for one step: the derived cross-head keys/values of every token's sequence,
    ``(1, G, D)`` when the whole step shares one first token (broadcast), else ``(1, N, G, D)``
    gathered from the slot table by each token's slot (per layer, so only one layer's copy exists)."""

    def __init__(self, table: "PhantomStateTable", slot: int | None, token_slots: torch.Tensor | None):
        self.table, self.slot, self.token_slots = table, slot, token_slots

    def __getitem__(self, layer: int) -> PhantomStates:
        rows = self.table.derived[layer]
        if self.token_slots is None:
            derived = tuple(t[self.slot:self.slot + 1] for t in rows)  # (1, G, D) views
        else:
            derived = tuple(t.index_select(0, self.token_slots)[None] for t in rows)  # (1, N, G, D)
        return PhantomStates(None, None, None, derived)


class PhantomStateTable:
    """Phantom states (the derived cross-head keys/values of every layer) per first-token id, in
    slots: computed once per distinct id by ``compute`` (a batch of ids -> per-layer states), kept
    while slots last, least recently used evicted first (recomputed if the id comes back). A step
    needing more distinct ids than there are slots doubles them. ``slot_of_id`` (vocab,) maps ids to
    slots on the device for vectorised look-ups (-1: not in the table)."""

    def __init__(self, compute, vocab_size: int, device, slots: int = 64):
        self.compute = compute
        self.vocab_size = vocab_size
        self.slots = max(1, int(slots))
        self.slot_of_id = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
        self.id_in_slot: list[int | None] = [None] * self.slots
        self.last_used = [0] * self.slots
        self.derived: list[tuple[torch.Tensor, ...]] | None = None  # per layer, 6 x (slots, G, D)
        self.clock = 0

    def ensure(self, ids: list[int]) -> None:
        """Make every id in ``ids`` (distinct) present; host-side, once per step."""
        self.clock += 1
        slot = {i: s for s, i in enumerate(self.id_in_slot) if i is not None}
        for i in ids:
            if i in slot:
                self.last_used[slot[i]] = self.clock
        missing = [i for i in ids if i not in slot]
        if not missing:
            return
        bad = [i for i in missing if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        if len(ids) > self.slots:
            self._grow(max(2 * self.slots, len(ids)))
        states = self.compute(torch.tensor(missing, device=self.slot_of_id.device))
        if self.derived is None:
            self.derived = [tuple(t.new_zeros((self.slots, *t.shape[1:])) for t in st.derived) for st in states]
        in_use = {slot[i] for i in ids if i in slot}
        free = sorted((s for s in range(self.slots) if s not in in_use),
                      key=lambda s: (self.id_in_slot[s] is not None, self.last_used[s]))
        for b, (i, s) in enumerate(zip(missing, free)):
            old = self.id_in_slot[s]
            if old is not None:
                self.slot_of_id[old] = -1
            self.id_in_slot[s], self.last_used[s] = i, self.clock
            self.slot_of_id[i] = s
            for layer, st in enumerate(states):
                for dst, src in zip(self.derived[layer], st.derived):
                    dst[s] = src[b]

    def _grow(self, slots: int) -> None:
        extra = slots - self.slots
        self.id_in_slot += [None] * extra
        self.last_used += [0] * extra
        if self.derived is not None:
            self.derived = [tuple(torch.cat([t, t.new_zeros((extra, *t.shape[1:]))]) for t in rows)
                            for rows in self.derived]
        self.slots = slots


__all__ = ["PhantomStateTable", "TokenStates", "first_tokens"]
