"""Per-sequence phantom states on vLLM's flattened steps (``phantom_ray.vllm.states``, pure torch):
the first token of every token's sequence, found from the step metadata vLLM gives the model, is the
true one through prefill, chunked prefill, decoding, prefix-cache hits and block reuse; the state
table computes each first token's states once and gives every token its own sequence's states."""

from __future__ import annotations

import torch

from phantom_ray.model.cache import PhantomStates
from phantom_ray.vllm.states import PhantomStateTable, TokenStates, first_tokens

BS = 4  # KV block size


class FakeKV:
    """Just enough of vLLM's scheduler/KV manager: sequences get blocks as they grow; a new sequence
    may reuse (prefix-cache hit) full blocks of a finished one whose tokens match from the start."""

    def __init__(self, num_blocks: int = 64):
        self.free = list(range(num_blocks))
        self.cached: dict[tuple, int] = {}  # token prefix of full blocks -> block id
        self.seqs: dict[str, dict] = {}

    def add(self, name: str, tokens: list[int]) -> None:
        blocks, computed = [], 0
        while computed + BS < len(tokens):  # full blocks that hit the cache (never the last token)
            key = tuple(tokens[: computed + BS])
            if key not in self.cached:
                break
            blocks.append(self.cached[key])
            computed += BS
        self.seqs[name] = {"tokens": list(tokens), "blocks": blocks, "computed": computed}

    def finish(self, name: str) -> None:
        s = self.seqs.pop(name)
        for b in s["blocks"]:
            if b not in self.cached.values():
                self.free.append(b)

    def step(self, budget: dict[str, int]):
        """Schedule ``budget[name]`` tokens per sequence: the step's metadata, as vLLM builds it."""
        ids, qsl, seq_lens, slots, tables = [], [0], [], [], []
        for name, n in budget.items():
            s = self.seqs[name]
            start = s["computed"]
            for pos in range(start, start + n):
                if pos // BS >= len(s["blocks"]):
                    s["blocks"].append(self.free.pop(0))
                slots.append(s["blocks"][pos // BS] * BS + pos % BS)
                ids.append(s["tokens"][pos])
            s["computed"] += n
            for k in range(s["computed"] // BS):  # full blocks become cacheable
                self.cached.setdefault(tuple(s["tokens"][: (k + 1) * BS]), s["blocks"][k])
            qsl.append(qsl[-1] + n)
            seq_lens.append(s["computed"])
            tables.append(s["blocks"])
        width = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        truth = [self.seqs[name]["tokens"][0] for name, n in budget.items() for _ in range(n)]
        return (torch.tensor(ids), torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
                bt, torch.tensor(slots)), truth


def test_first_tokens_through_prefill_decode_prefix_hits_and_reuse():
    kv = FakeKV()
    table = torch.zeros(65, dtype=torch.long)

    def run(budget):
        (ids, qsl, seq_lens, bt, slots), truth = kv.step(budget)
        seq, first, per_seq = first_tokens(ids, qsl, seq_lens, bt, slots, BS, table)
        assert first.tolist() == truth, budget
        assert per_seq.tolist() == [kv.seqs[n]["tokens"][0] for n in budget]
        assert seq.tolist() == [i for i, (_, n) in enumerate(budget.items()) for _ in range(n)]

    a = [7, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11]
    kv.add("a", a)
    kv.add("b", [3] + a[1:])  # same tokens after another first token
    run({"a": 6, "b": 11})  # chunked prefill of a, whole prefill of b
    kv.seqs["b"]["tokens"].append(12)
    run({"a": 5, "b": 1})  # a's second chunk next to b's first decode token
    for _ in range(6):  # decoding across block boundaries
        for s in ("a", "b"):
            kv.seqs[s]["tokens"].append(5)
        run({"a": 1, "b": 1})
    kv.add("c", a + [99])  # prefix-cache hit on a's full blocks, first block included
    assert kv.seqs["c"]["computed"] == 8
    run({"c": len(a) + 1 - 8})
    kv.finish("a")
    kv.finish("b")
    kv.cached.clear()  # evicted: the blocks are reused by sequences with other first tokens
    kv.free = sorted(set(kv.free) | set(range(64)) - {b for s in kv.seqs.values() for b in s["blocks"]})
    kv.add("d", [42, 1, 2, 3, 4, 5, 6])
    kv.add("e", [0, 9, 9])
    kv.seqs["c"]["tokens"].append(1)
    run({"d": 7, "c": 1, "e": 3})
    for s in ("d", "c", "e"):
        kv.seqs[s]["tokens"].append(1)
    run({"d": 1, "c": 1, "e": 1})


def test_padding_slots_write_the_sink():
    table = torch.zeros(9, dtype=torch.long)
    ids = torch.tensor([5, 6, 7, 0])
    qsl = torch.tensor([0, 3], dtype=torch.int32)
    _, first, _ = first_tokens(ids, qsl, torch.tensor([3]), torch.tensor([[2]]), torch.tensor([8, 9, 10, -1]), BS, table)
    assert first.tolist()[:3] == [5, 5, 5]
    assert table[2] == 5 and table[-1] == 5  # the pad token's write went to the sink


def _compute_counter(calls):
    """Fake per-layer states: derived tensors that encode the token id (2 layers, G=3, D=2)."""

    def compute(ids):
        calls.append(ids.tolist())
        out = []
        for layer in range(2):
            base = ids.float()[:, None, None] * 10 + layer
            out.append(PhantomStates(None, None, None, tuple(base.expand(-1, 3, 2) + k for k in range(6))))
        return out

    return compute


def test_state_table_computes_once_evicts_lru_and_grows():
    calls = []
    table = PhantomStateTable(_compute_counter(calls), vocab_size=100, device="cpu", slots=2)
    table.ensure([5])
    table.ensure([5])
    assert calls == [[5]]
    table.ensure([5, 9])
    table.ensure([9])  # 5 is now least recently used
    table.ensure([11])  # evicts 5
    assert calls == [[5], [9], [11]] and int(table.slot_of_id[5]) == -1
    table.ensure([1, 2, 3])  # more distinct ids than slots in one step: the table grows
    assert table.slots >= 3 and all(int(table.slot_of_id[i]) >= 0 for i in (1, 2, 3))
    # every token gets its own sequence's states; a shared first token broadcasts the same values
    first = torch.tensor([1, 1, 3, 2, 3])
    gathered = TokenStates(table, None, table.slot_of_id[first])[1].derived
    assert gathered[0].shape == (1, 5, 3, 2)
    assert gathered[4][0, :, 0, 0].tolist() == [f * 10 + 1 + 4 for f in first.tolist()]
    one = TokenStates(table, int(table.slot_of_id[3]), None)[0].derived
    assert one[0].shape == (1, 3, 2) and float(one[2][0, 0, 0]) == 3 * 10 + 0 + 2
