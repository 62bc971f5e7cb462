"""Per-request decoding state: the KV cache plus the per-sequence phantom states.

Everything a request needs between forward calls lives here, never on modules (the original kept
phantom states as attributes of each attention module: docs/phantom.md#d1-module-state, D2, D16). One ``PhantomCache`` is
one batch of sequences; two requests use two caches and can be interleaved freely on one model.

Keys and values are stored **augmented**: ``[k, k*]`` and ``[v, v*]`` (head dim 2D) when the
phantom branch is on. k* and v* of a token depend only on that token's own k, v and the fixed
phantom states of its sequence (docs/phantom.md#where-states-live), so caching them is exact and a decode step computes the
phantom halves of the one new token instead of all T cached ones (the original recomputed them at
every step, which made decoding 3-11x slower).

Buffers are preallocated and grow by doubling, so a decode step writes in place instead of
concatenating the whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PhantomStates:
    """Phantom token states of one layer, per sequence: q (B,1,H,D), k and v (B,1,Hk,D)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    # cross-head attention keys/values derived from the states by the (fixed) phantom weights,
    # computed once per request: (q_keys, q_values, k_keys, k_values, v_keys, v_values), each (B, G, D)
    derived: tuple[torch.Tensor, ...] | None = None

    def index_select(self, idx: torch.Tensor) -> "PhantomStates":
        derived = None if self.derived is None else tuple(t.index_select(0, idx) for t in self.derived)
        return PhantomStates(self.q.index_select(0, idx), self.k.index_select(0, idx), self.v.index_select(0, idx),
                             derived)


class PhantomCache:
    def __init__(self, num_layers: int, initial_capacity: int = 256):
        self.num_layers = num_layers
        self.initial_capacity = initial_capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # (B, Hk, capacity, Dk)
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.phantom: list[PhantomStates | None] = [None] * num_layers
        self.length = 0  # slots filled (same for every row: rows are left padded)
        self.key_mask: torch.Tensor | None = None  # (B, length) bool, False at padding slots
        self.next_position: torch.Tensor | None = None  # (B,) position id of each row's next token
        self.phantom_index: torch.Tensor | None = None  # (B,) absolute slot of each row's phantom token

    # ---- bookkeeping done once per forward, by the model ------------------------------------------
    @property
    def batch_size(self) -> int | None:
        return None if self.key_mask is None else self.key_mask.shape[0]

    def pending_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Key-validity mask (B, length + L) for a forward adding ``new_mask`` (B, L)."""
        if self.key_mask is None:
            return new_mask.bool()
        if new_mask.shape[0] != self.key_mask.shape[0]:
            raise ValueError(
                f"batch size {new_mask.shape[0]} does not match the cache's batch size {self.key_mask.shape[0]}"
            )
        return torch.cat([self.key_mask, new_mask.bool()], dim=1)

    def commit(self, new_mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Advance the cache after every layer wrote its slots for this forward."""
        self.key_mask = self.pending_mask(new_mask)
        self.length = self.key_mask.shape[1]
        last = torch.where(new_mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=1)
        prev = self.next_position if self.next_position is not None else torch.zeros_like(last)
        self.next_position = torch.maximum(prev, last + 1)

    # ---- per layer ------------------------------------------------------------------------------
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hk, L, Dk) at slots [length, length+L); return views of all slots."""
        start, n = self.length, k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        need = start + n
        if buf_k is None or buf_k.shape[2] < need or buf_k.shape[0] != k.shape[0] or buf_k.shape[3] != k.shape[3]:
            cap = max(self.initial_capacity, 1)
            while cap < need:
                cap *= 2
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if buf_k is not None and start:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:need] = k
        buf_v[:, :, start:need] = v
        return buf_k[:, :, :need], buf_v[:, :, :need]

    # ---- beams / sampling several continuations ---------------------------------------------------
    def index_select(self, idx: torch.Tensor) -> None:
        """Reorder or repeat the batch rows (beam search, n > 1): row i becomes old row idx[i]."""
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i].index_select(0, idx)
                self.values[i] = self.values[i].index_select(0, idx)
            if self.phantom[i] is not None:
                self.phantom[i] = self.phantom[i].index_select(idx)
        for name in ("key_mask", "next_position", "phantom_index"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, idx))

    def nbytes(self) -> int:
        total = 0
        for t in self.keys + self.values:
            if t is not None:
                total += t[:, :, : self.length].numel() * t.element_size()
        return total
