"""Dynamic batching generation engine of one replica (pure asyncio + torch, no Ray).

Requests wait in an asyncio queue. A background task takes the first waiting request, collects
more for up to ``batch_wait_timeout_s`` (or until ``max_batch_size``; requests that arrived while
the previous batch ran are taken at once), and runs one batched ``model.generate`` in a worker
thread, so the replica's event loop keeps accepting requests meanwhile. The model's greedy decoding
is batch-invariant, so a request gets the same tokens alone or in a batch of sixteen.

Every request receives events through its own queue, token by token (the model's
``stream_callback``; deltas that queued up while the consumer was busy are merged into one): ``{"type": "delta", "text": ...}`` pieces, then one
``{"type": "done", "finish_reason", "prompt_tokens", "completion_tokens"}``, or one
``{"type": "error", "status", "code", "message"}``. Streaming and non-streaming answers are the same
events; a non-streaming answer is their concatenation.

Text is decoded incrementally: a trailing partial UTF-8 character is held back until it completes,
and so is a tail that could be the start of a stop string; a stop string ends its row (the text
before it is the answer). A row also ends at a stop token, at its own ``max_tokens`` or when its
client goes away; the batch stops as soon as all its rows have ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from phantom_ray.processing import Sample

log = logging.getLogger(__name__)

@dataclass
class GenerationRequest:
    """One request's tokens and decoding parameters (already validated by the HTTP layer)."""

    sample: Sample  # input_ids (L,), pixel_values (T,3,S,S) or None
    max_tokens: int
    temperature: float = 0.0  # <= 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def group_key(self) -> tuple:
        """Requests that can share one ``generate`` call (the sampling knobs are batch-wide)."""
        if self.greedy:
            return ("greedy", self.ignore_eos)
        return ("sample", float(self.temperature), float(self.top_p), self.ignore_eos)


class _BatchDone(Exception):
    """Raised from the stream callback to end a batch whose rows have all finished."""


@dataclass
class _Entry:
    request: GenerationRequest
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    submitted: float
    cancelled: bool = False
    # filled by the generation thread
    ids: list[int] = field(default_factory=list)
    emitted: str = ""
    done: bool = False
    finish_reason: str | None = None
    first_token_at: float | None = None
    completion_tokens: int = 0

    def put(self, event: dict) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class NullMetrics:
    """Metrics sink that records nothing (see ``phantom_ray.serving.metrics.ServingMetrics``)."""

    def batch(self, size: int) -> None: ...
    def first_token(self, ttft_s: float) -> None: ...
    def finished(self, latency_s: float, completion_tokens: int, decode_s: float, status: str) -> None: ...


class BatchingEngine:
    """Groups concurrent requests into batched generation; see the module docstring."""

    def __init__(self, model, processor, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
                 metrics=None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.metrics = metrics if metrics is not None else NullMetrics()
        self.stop_token_ids = list(processor.stop_token_ids)
        self._pending: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # one generation at a time per replica: batches are the unit of parallelism
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="phantom-generate")
        self.batch_sizes: list[int] = []  # every batch run, for tests and stats

    # ---- public ----------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[dict]:
        """Events of one request (see the module docstring); cancelling the iteration frees its row."""
        self._ensure_started()
        entry = _Entry(request, asyncio.Queue(), self._loop, time.monotonic())
        await self._pending.put(entry)
        held = None
        try:
            while True:
                event = held if held is not None else await entry.queue.get()
                held = None
                # deltas that piled up while the consumer was busy go out as one: a slow stream
                # (many rows, a remote caller) sends fewer, larger pieces instead of falling behind
                while event["type"] == "delta" and not entry.queue.empty():
                    nxt = entry.queue.get_nowait()
                    if nxt["type"] != "delta":
                        held = nxt
                        break
                    event = {"type": "delta", "text": event["text"] + nxt["text"]}
                yield event
                if event["type"] in ("done", "error"):
                    return
        finally:
            entry.cancelled = True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- batching loop ---------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._pending = asyncio.Queue()
            self._task = loop.create_task(self._run_forever(), name="phantom-batching-loop")

    async def _collect(self) -> list[_Entry]:
        batch = [await self._pending.get()]
        deadline = self._loop.time() + self.batch_wait_timeout_s
        while len(batch) < self.max_batch_size:
            if not self._pending.empty():
                batch.append(self._pending.get_nowait())
                continue
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._pending.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run_forever(self) -> None:
        while True:
            batch = [e for e in await self._collect() if not e.cancelled]
            groups: dict[tuple, list[_Entry]] = {}
            for e in batch:
                groups.setdefault(e.request.group_key(), []).append(e)
            for group in groups.values():
                try:
                    await self._loop.run_in_executor(self._executor, self._run_batch, group)
                except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the replica's loop
                    log.exception("batched generation failed for %d requests", len(group))
                    for e in group:
                        if not e.done:
                            e.done = True
                            e.put({"type": "error", "status": 500, "code": "generation_failed",
                                   "message": f"generation failed: {type(exc).__name__}: {exc}"})
                            self.metrics.finished(time.monotonic() - e.submitted, e.completion_tokens, 0.0, "error")

    # ---- generation (worker thread) --------------------------------------------------------------
    def _run_batch(self, group: list[_Entry]) -> None:
        self.batch_sizes.append(len(group))
        self.metrics.batch(len(group))
        first = group[0].request
        batch = self.processor.collate([e.request.sample for e in group], padding_side="left")
        device = self.model.device
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        pixel_values = batch["pixel_values"]
        if pixel_values is not None:
            pixel_values = pixel_values.to(device=device, dtype=self.model.dtype)
        generators = None
        if not first.greedy:
            generators = []
            for e in group:
                seed = e.request.seed if e.request.seed is not None else random.getrandbits(63)
                generators.append(torch.Generator(device=device).manual_seed(seed))
        stops = [] if first.ignore_eos else self.stop_token_ids
        stop_set = set(stops)
        max_new = max(e.request.max_tokens for e in group)
        decode_started = time.monotonic()

        def on_step(step: int, tokens: torch.Tensor, finished: torch.Tensor) -> None:
            toks = tokens.tolist()
            now = time.monotonic()
            for e, tok in zip(group, toks):
                if e.done:
                    continue
                if e.cancelled:
                    e.done, e.finish_reason = True, "cancelled"
                    continue
                e.completion_tokens += 1
                if e.first_token_at is None:
                    e.first_token_at = now
                    self.metrics.first_token(now - e.submitted)
                if tok in stop_set:
                    self._finish(e, "stop")
                    continue
                e.ids.append(tok)
                self._emit(e)
                if not e.done and e.completion_tokens >= e.request.max_tokens:
                    self._finish(e, "length")
            if all(e.done for e in group):
                raise _BatchDone

        with torch.inference_mode():
            try:
                self.model.generate(
                    input_ids, attention_mask, pixel_values,
                    max_new_tokens=max_new, do_sample=not first.greedy, temperature=max(first.temperature, 1e-5),
                    top_p=first.top_p, stop_token_ids=stops, pad_token_id=self.processor.pad_token_id,
                    generator=generators, stream_callback=on_step,
                )
            except _BatchDone:
                pass
        decode_s = time.monotonic() - decode_started
        for e in group:
            if not e.done:  # generate ran out of steps (every row at its max_tokens) without our callback ending it
                self._finish(e, "length")
            if e.finish_reason != "cancelled":
                self.metrics.finished(time.monotonic() - e.submitted, e.completion_tokens, decode_s, "ok")

    def _text(self, e: _Entry) -> str:
        return self.processor.tokenizer.decode(e.ids, skip_special_tokens=True)

    def _emit(self, e: _Entry) -> None:
        """Send the new, settled part of a row's text; end the row at a stop string."""
        text = self._text(e)
        stops = e.request.stop
        for s in stops:
            k = text.find(s, max(0, len(e.emitted) - len(s) + 1))
            if k >= 0:
                self._send(e, text[:k])
                self._finish(e, "stop", flush=False)
                return
        safe = len(text)
        while safe > 0 and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 character: wait for its bytes
            safe -= 1
        for s in stops:  # a tail that may grow into a stop string is held back
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[safe - n:safe] == s[:n]:
                    safe -= n
                    break
        self._send(e, text[:safe])

    def _send(self, e: _Entry, text: str) -> None:
        if text.startswith(e.emitted) and len(text) > len(e.emitted):
            e.put({"type": "delta", "text": text[len(e.emitted):]})
            e.emitted = text

    def _finish(self, e: _Entry, reason: str, flush: bool = True) -> None:
        if flush:
            self._send(e, self._text(e))
        e.done, e.finish_reason = True, reason
        e.put({"type": "done", "finish_reason": reason, "prompt_tokens": len(e.request.sample),
               "completion_tokens": e.completion_tokens})

