"""The vllm captioning path of a replica without vLLM or Ray: ``ChunkCaptioner`` hands every open
image to an engine with ``submit`` (requests in flight, bounded by a window) and records results,
error rows and the chunk's shard exactly as the batched path does (the same rows, in order)."""

from __future__ import annotations

import io
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from PIL import Image

from phantom_ray.caption import CaptionConfig
from phantom_ray.caption import stage as stage_mod
from phantom_ray.caption.plan import make_plan, read_shard, shard_name
from phantom_ray.caption.stage import ChunkCaptioner
from phantom_ray.infer.api import Generation, SamplingParams
from phantom_ray.ingest import DEFAULT_LIMITS


class _FakeEngine:
    """Answers each request with its image's width; counts the requests in flight at once."""

    def __init__(self, submit: bool):
        self.pool = ThreadPoolExecutor(8)
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0
        if submit:
            self.submit = self._submit

    def _answer(self, r) -> Generation:
        return Generation(text=f" w{r.images[0].size[0]} ", finish_reason="length", prompt_tokens=3,
                          completion_tokens=2)

    def _submit(self, r) -> Future:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

        def run():
            import time

            time.sleep(0.002)
            with self.lock:
                self.in_flight -= 1
            return self._answer(r)
        return self.pool.submit(run)

    def generate(self, requests):
        return [self._answer(r) for r in requests]


def _captioner(tmp_path, engine, n_good=40):
    images = tmp_path / "in"
    images.mkdir(parents=True)
    for i in range(n_good):
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 10 + i, 3), dtype=np.uint8)).save(buf, "PNG")
        (images / f"img{i:03d}.png").write_bytes(buf.getvalue())
    (images / "zbad.png").write_bytes(b"not an image")
    out = tmp_path / f"out-{'submit' if hasattr(engine, 'submit') else 'batch'}"
    cfg = CaptionConfig(input=str(images), output=str(out), model="tiny-qwen2", shard_size=1000, batch_size=4)
    make_plan(cfg)
    c = object.__new__(ChunkCaptioner)
    c.job = {"output": str(out), "format": "parquet", "prompt": "describe", "prompt_column": None, "batch_size": 4,
             "record": {**cfg.job_record(), "engine": "fake"}}
    c.sampling = SamplingParams(max_tokens=2)
    c.engine = engine
    c.limits = DEFAULT_LIMITS
    c.pool = ThreadPoolExecutor(2)
    return c, out


def test_submit_path_equals_batched_path_and_keeps_requests_in_flight(tmp_path, monkeypatch):
    monkeypatch.setattr(stage_mod, "VLLM_IN_FLIGHT", 16)
    fast, out_fast = _captioner(tmp_path / "a", _FakeEngine(submit=True))
    slow, out_slow = _captioner(tmp_path / "b", _FakeEngine(submit=False))
    assert fast.caption_chunk(0)["written"] and slow.caption_chunk(0)["written"]
    rows_fast = read_shard(str(out_fast / shard_name(0, "parquet")))
    rows_slow = read_shard(str(out_slow / shard_name(0, "parquet")))
    assert [r["caption"] for r in rows_fast] == [r["caption"] for r in rows_slow]
    assert [r["error"] for r in rows_fast] == [r["error"] for r in rows_slow]
    assert rows_fast[-1]["error"] == "undecodable_image" and rows_fast[0]["caption"] == "w10"
    assert 1 < fast.engine.peak <= 16, fast.engine.peak  # many in flight, never more than the window


def test_token_ids_without_pixels_equal_the_tiled_prompt():
    """The vllm engine's prompts skip our tiling (vLLM tiles the images itself): the same ids and
    tile counts as the full encode, for every grid shape."""
    from phantom_ray.loader import load_model

    proc = load_model("tiny-qwen2", device="cpu", dtype="float32").processor
    chat = [{"role": "user", "content": "<image>hi"}]
    for w, h in [(10, 10), (448, 100), (1000, 300), (30, 900), (896, 448), (2000, 2000)]:
        im = Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8))
        full = proc.encode(chat, images=[im], add_generation_prompt=True)
        ids_only = proc.encode(chat, images=[im], add_generation_prompt=True, with_pixels=False)
        assert ids_only.pixel_values is None and ids_only.num_tiles == full.num_tiles, (w, h)
        assert ids_only.input_ids.tolist() == full.input_ids.tolist(), (w, h)
