"""The torch engine's dynamic batching behind a serving worker (no Ray): batched answers equal unbatched ones, streaming pieces add up to
the answer, stop strings and max_tokens end a row, seeded sampling does not depend on batch mates."""

from __future__ import annotations

import asyncio

import pytest
import torch

from phantom_ray.serving.config import ModelSpec
from phantom_ray.serving.worker import ModelWorker
from helpers import png_bytes

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def worker():
    return ModelWorker(ModelSpec(name="tiny-qwen2", checkpoint="tiny-qwen2", engine="torch", max_batch_size=16,
                                 max_ongoing_requests=16, batch_wait_timeout_s=0.05, torch_num_threads=1,
                                 max_prompt_tokens=256))


def payload(i: int, **kw) -> dict:
    p = {"messages": [{"role": "user", "content": f"question {i} " * (i % 5 + 1)}],
         "images": [png_bytes((24 + 4 * i, 30), (10 * i, 50, 100))] if i % 2 else [],
         "max_tokens": 5 + i, "temperature": 0.0, "ignore_eos": i % 3 != 0}
    p.update(kw)
    return p


async def run_one(worker, p) -> tuple[str, dict, list[str]]:
    pieces, final = [], None
    async for event in worker.generate(p):
        if event["type"] == "delta":
            pieces.append(event["text"])
        else:
            final = event
    return "".join(pieces), final, pieces


def test_sixteen_concurrent_requests_equal_one_at_a_time(worker):
    payloads = [payload(i) for i in range(16)]

    async def main():
        sequential = [await run_one(worker, p) for p in payloads]
        n_before = len(worker.engine.batch_sizes)
        concurrent = await asyncio.gather(*(run_one(worker, p) for p in payloads))
        return sequential, concurrent, worker.engine.batch_sizes[n_before:]

    sequential, concurrent, batches = asyncio.run(main())
    assert max(batches) > 1, f"concurrent requests were not batched: {batches}"
    assert sum(batches) == 16
    for i, (a, b) in enumerate(zip(sequential, concurrent)):
        assert a[0] == b[0], f"request {i}: batched text differs"
        assert a[1] == b[1], f"request {i}: batched finish/usage differs"
        assert a[1]["type"] == "done"
        if payloads[i]["ignore_eos"]:
            assert a[1]["completion_tokens"] == payloads[i]["max_tokens"] and a[1]["finish_reason"] == "length"
    # the texts are real answers of different lengths, not one repeated string
    assert len({a[0] for a in sequential}) > 8


def test_stop_string_ends_the_row_and_is_never_streamed(worker):
    full, final, _ = asyncio.run(run_one(worker, payload(1, max_tokens=24, ignore_eos=True)))
    assert final["finish_reason"] == "length" and len(full) >= 6
    stop = full[3:5]
    cut = full[: full.find(stop)]
    text, final, pieces = asyncio.run(run_one(worker, payload(1, max_tokens=24, ignore_eos=True, stop=[stop])))
    assert text == cut
    assert final["finish_reason"] == "stop"
    assert all(stop not in p for p in pieces)
    assert final["completion_tokens"] < 24


def test_seeded_sampling_is_reproducible_alone_and_batched(worker):
    p = payload(2, temperature=0.9, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)
    others = [payload(k, temperature=0.9, top_p=0.95, seed=k, max_tokens=12, ignore_eos=True) for k in range(3, 8)]

    async def main():
        alone = await run_one(worker, p)
        together = await asyncio.gather(run_one(worker, p), *(run_one(worker, o) for o in others))
        return alone, together[0]

    alone, batched = asyncio.run(main())
    assert alone[0] == batched[0] and alone[1] == batched[1]
    other_seed = asyncio.run(run_one(worker, {**p, "seed": 99}))
    greedy = asyncio.run(run_one(worker, {**p, "temperature": 0.0}))
    assert {alone[0], other_seed[0], greedy[0]} != {alone[0]}, "sampling ignored the seed and temperature"


def test_bad_inputs_become_error_events_and_the_worker_keeps_serving(worker):
    async def main():
        too_long = await run_one(worker, payload(0, messages=[{"role": "user", "content": "word " * 400}]))
        broken = await run_one(worker, payload(1, images=[png_bytes()[:60]]))
        mismatch = await run_one(worker, payload(0, images=[png_bytes(), png_bytes()],
                                                 messages=[{"role": "user", "content": "<image> only one"}]))
        ok = await run_one(worker, payload(3))
        return too_long, broken, mismatch, ok

    too_long, broken, mismatch, ok = asyncio.run(main())
    assert too_long[1]["type"] == "error" and too_long[1]["status"] == 400
    assert too_long[1]["code"] == "prompt_exceeds_max_length"
    assert broken[1]["type"] == "error" and broken[1]["status"] == 400 and broken[1]["code"] == "undecodable_image"
    assert mismatch[1]["status"] == 400 and mismatch[1]["code"] == "image_count_mismatch"
    assert ok[1]["type"] == "done"
    stats = worker.stats()
    assert stats["requests"]["error"] >= 3 and stats["requests"]["ok"] >= 1
    assert stats["max_batch_size"] >= 1 and stats["completion_tokens"] > 0


def test_deltas_stream_in_pieces_and_add_up(worker):
    text, final, pieces = asyncio.run(run_one(worker, payload(4, max_tokens=24, ignore_eos=True)))
    assert final["completion_tokens"] == 24
    assert len(pieces) > 1, "the answer came as one piece: not streamed"
    assert "".join(pieces) == text


def _save_with_tokenizer(model, tokenizer, where: str) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        extra = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    model.save_pretrained(where, extra_files=extra)


def test_worker_loads_checkpoints_from_a_directory_and_s3(worker, tmp_path, s3_bucket):
    p = payload(3, max_tokens=10, ignore_eos=True)
    want = asyncio.run(run_one(worker, p))[0]
    local = str(tmp_path / "export")
    _save_with_tokenizer(worker.model, worker.processor.tokenizer, local)
    uri = f"{s3_bucket}/export/tiny-qwen2"
    _save_with_tokenizer(worker.model, worker.processor.tokenizer, uri)
    for checkpoint in (local, uri):
        spec = ModelSpec(name="exported", checkpoint=checkpoint, engine="torch", torch_num_threads=1)
        assert not spec.is_preset
        loaded = ModelWorker(spec)
        assert asyncio.run(run_one(loaded, p))[0] == want, checkpoint
