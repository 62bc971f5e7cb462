"""TorchEngine: the ``torch`` backend of :mod:`phantom_ray.infer.api`, over our own model.

One engine for every caller (serving replicas, batch captioning, eval, training-time evaluation,
the quickstart); the numerical reference the vLLM backend is tested against. No Ray here.

* ``generate(requests)``: a batch of requests in, one :class:`Generation` per request out; a bad
  image or prompt gives an error Generation (reason code, e.g. ``undecodable_image``) in its place.
* ``stream(request)``: events of one online request. Concurrent streams are batched dynamically:
  a background task takes the first waiting request, collects more for up to
  ``batch_wait_timeout_s`` (or until ``max_batch_size``; requests that arrived while the previous
  batch ran are taken at once) and runs one batched generation in a worker thread, so the event
  loop keeps accepting requests meanwhile.

Both paths run the same per-row decoding (:meth:`TorchEngine._run_rows`) and turn tokens into text
through the engine core (:class:`phantom_ray.infer.core.TextStream`, which the vLLM backend
composes too), so a streamed answer is the same text as a generated one:

* Greedy decoding is batch-invariant: the model's ``generate`` keeps rows independent (prompts are
  left padded), so a request gets the same tokens alone or in a batch of sixteen.
* Sampling draws from one ``torch.Generator`` per row seeded with ``params.seed_for(request.key)``,
  so a sampled answer is reproducible per request key and does not depend on its batch mates.
  Temperature and top_p are per row (greedy and sampled requests share a batch); requests share one
  ``generate`` call when their top_k and ``ignore_eos`` agree.
* Beam search (``num_beams > 1``) is :func:`phantom_ray.model.generation.beam_search`.
* Text is decoded incrementally: a trailing partial UTF-8 character is held back until it
  completes, and so is a tail that could be the start of a stop string; a stop string ends its row
  (the text before it is the answer). A row also ends at a stop token, at its own ``max_tokens``
  or when its client goes away; a batch stops as soon as all its rows have ended.

``Generation.text`` is the decoded answer as generated (not stripped; captioning and eval strip
it). ``completion_tokens`` counts generated tokens, the stop token included.

    engine = TorchEngine.load("tiny-qwen2")
    [g] = engine.generate([Request.user("Describe the image.", images=[png], params=SamplingParams(max_tokens=32))])
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import AsyncIterator, Sequence

import torch

from phantom_ray.infer.api import Event, Generation, Request, SamplingParams
from phantom_ray.infer.core import NullMetrics, TextStream, error_event, error_generation
from phantom_ray.processing import ProcessingError, Sample
from phantom_ray.processing.errors import SampleError

log = logging.getLogger(__name__)


class _BatchDone(Exception):
    """Raised from the step callback to end a batch whose rows have all finished."""


def group_key(params: SamplingParams) -> tuple:
    """Requests that can share one ``generate`` call: temperature and top_p are per row (greedy and
    sampled rows mix), top_k and the stop tokens are batch-wide; beam search runs apart."""
    p = params
    if p.num_beams > 1:
        return ("beam", p.num_beams, p.length_penalty, p.max_tokens, p.ignore_eos)
    return ("step", int(p.top_k), p.ignore_eos)


class TorchEngine:
    """A model + tokenizer + processor on one device; see the module docstring."""

    backend = "torch"

    def __init__(self, model, tokenizer, processor=None, *, model_id: str = "unnamed", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, metrics=None, max_length: int = 4096):
        from phantom_ray.processing import PhantomProcessor

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor or PhantomProcessor(model.config, tokenizer, max_length=max_length)
        self.model_id = str(model_id)
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.metrics = metrics if metrics is not None else NullMetrics()
        self.batch_sizes: list[int] = []  # every batch run, for tests and stats
        # streaming: one generation at a time per engine; batches are the unit of parallelism
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # generate() and the streaming thread never run the model at once

    @classmethod
    def load(cls, model_id: str, *, device: str | None = None, dtype: str | torch.dtype | None = "auto",
             attn_implementation: str = "sdpa", seed: int = 0, max_length: int = 4096,
             max_pixels: int | None = None, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
             metrics=None, **unused) -> "TorchEngine":
        """``model_id``: anything :func:`phantom_ray.loader.load_model` takes. Options other backends
        take (``max_model_len``, ``gpu_memory_utilization``, ...) are accepted and ignored here."""
        from phantom_ray.loader import load_model

        if unused:
            log.debug("torch engine ignores options %s", sorted(unused))
        loaded = load_model(model_id, device=device, dtype=dtype, attn_implementation=attn_implementation,
                            seed=seed, max_length=max_length, max_pixels=max_pixels)
        return cls(loaded.model, loaded.tokenizer, loaded.processor, model_id=loaded.model_id,
                   max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s, metrics=metrics)

    @property
    def dtype_name(self) -> str:
        return str(self.model.dtype).replace("torch.", "")

    # ---- preprocessing -----------------------------------------------------------------------------
    # request features of vLLM's that this engine does not have: refused per request, never ignored
    UNSUPPORTED = {"logprobs": lambda p: p.logprobs is not None,
                   "response_format": lambda p: p.json_schema is not None}

    def prepare(self, request: Request) -> Sample:
        """Request -> generation prompt Sample (labels None); raises ProcessingError."""
        refused = [name for name, asks in self.UNSUPPORTED.items() if asks(request.params)]
        if refused:
            raise SampleError("unsupported_parameter",
                              f"{' and '.join(refused)} {'is' if len(refused) == 1 else 'are'} not supported by the "
                              f"torch engine; serve this model on engine vllm for it")
        if request.prompt is not None:
            return self.processor.encode_raw(request.prompt)
        sample = self.processor.encode(request.messages, images=list(request.images) or None,
                                       system=request.system, add_generation_prompt=True)
        sample.labels = None
        return sample

    # ---- batch generation --------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request], *, batch_size: int | None = None) -> list[Generation]:
        """One Generation per request, in order; a request the processor rejects gives an error row."""
        samples: list[Sample | Exception] = []
        for r in requests:
            try:
                samples.append(self.prepare(r))
            except ProcessingError as exc:
                samples.append(exc)
        return self.generate_samples(samples, [r.params for r in requests], [r.key or str(i) for i, r in
                                                                            enumerate(requests)],
                                     batch_size=batch_size)

    def generate_samples(self, samples: Sequence[Sample | Exception], params: SamplingParams | Sequence[SamplingParams],
                         keys: Sequence[str] | None = None, *, batch_size: int | None = None) -> list[Generation]:
        """Generate for prompts already tokenized (a captioning decode stage's output); an Exception
        in ``samples`` passes through as an error Generation."""
        batch_size = batch_size or self.max_batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(params, SamplingParams):
            params = [params] * len(samples)
        keys = list(keys) if keys is not None else [str(i) for i in range(len(samples))]
        if not len(keys) == len(params) == len(samples):
            raise ValueError(f"{len(keys)} keys and {len(params)} params for {len(samples)} samples")
        out: list[Generation | None] = [None] * len(samples)
        groups: dict[tuple, list[tuple[int, TextStream]]] = {}
        for i, s in enumerate(samples):
            if isinstance(s, Exception):
                out[i] = error_generation(s)
                continue
            row = self.text_stream(s, params[i], keys[i])
            groups.setdefault(group_key(row.params), []).append((i, row))
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                rows = [r for _, r in chunk]
                with self._lock:
                    self._run_rows(rows)
                for i, r in chunk:
                    out[i] = r.generation()
        return out  # type: ignore[return-value]

    def text_stream(self, sample: Sample, params: SamplingParams, key: str, sink=None) -> TextStream:
        """The per-request text stream of a prepared prompt (see :mod:`phantom_ray.infer.core`)."""
        stops = frozenset() if params.ignore_eos else frozenset(self.processor.stop_token_ids)
        return TextStream(params, key, self.processor.decode, stops, prompt_tokens=len(sample),
                          num_tiles=sum(sample.num_tiles), sink=sink, metrics=self.metrics, prompt=sample)

    # ---- streaming ---------------------------------------------------------------------------------
    async def stream(self, request: Request) -> AsyncIterator[Event]:
        """Events of one request: ``delta`` pieces, then one ``done`` or one ``error``. Cancelling
        the iteration (client gone) frees its row at the next step."""
        try:
            # image decoding and tokenisation off the event loop: other requests keep flowing
            sample = await asyncio.to_thread(self.prepare, request)
        except ProcessingError as exc:
            self.metrics.rejected("error")
            yield error_event(exc)
            return
        self._ensure_started()
        queue: asyncio.Queue = asyncio.Queue()
        loop = self._loop
        row = self.text_stream(sample, request.params, request.key,
                               sink=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        await self._pending.put(row)
        held = None
        try:
            while True:
                event = held if held is not None else await queue.get()
                held = None
                # deltas that piled up while the consumer was busy go out as one: a slow stream
                # (many rows, a remote caller) sends fewer, larger pieces instead of falling behind
                while event.type == "delta" and not queue.empty():
                    nxt = queue.get_nowait()
                    if nxt.type != "delta":
                        held = nxt
                        break
                    event = Event(type="delta", text=event.text + nxt.text)
                yield event
                if event.type in ("done", "error"):
                    return
        finally:
            row.cancelled = True

    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._pending = asyncio.Queue()
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                       thread_name_prefix="phantom-generate")
            self._task = loop.create_task(self._run_forever(), name="phantom-batching-loop")

    async def _collect(self) -> list[TextStream]:
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

    def _run_locked(self, rows: list[TextStream]) -> None:
        with self._lock:
            self._run_rows(rows)

    async def _run_forever(self) -> None:
        while True:
            batch = [r for r in await self._collect() if not r.cancelled]
            groups: dict[tuple, list[TextStream]] = {}
            for r in batch:
                groups.setdefault(group_key(r.params), []).append(r)
            for group in groups.values():
                try:
                    await self._loop.run_in_executor(self._executor, self._run_locked, group)
                except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the replica's loop
                    log.exception("batched generation failed for %d requests", len(group))
                    for r in group:
                        if not r.done:
                            r.done = True
                            r.put(Event(type="error", status=500, code="generation_failed",
                                        message=f"generation failed: {type(exc).__name__}: {exc}"))
                            self.metrics.finished(time.monotonic() - r.submitted, r.completion_tokens, 0.0, "error")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.close()

    def close(self) -> None:
        if self._task is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ---- generation (caller's or worker thread) ----------------------------------------------------
    def _inputs(self, samples: Sequence[Sample]) -> dict:
        batch = self.processor.collate(samples, padding_side="left")
        dev = self.model.device
        pv = batch["pixel_values"]
        return {"input_ids": batch["input_ids"].to(dev), "attention_mask": batch["attention_mask"].to(dev),
                "pixel_values": pv.to(device=dev, dtype=self.model.dtype) if pv is not None else None}

    @torch.inference_mode()
    def _run_rows(self, rows: list[TextStream]) -> None:
        """Decode one group of rows (equal group keys) to their ends; fills each row's text."""
        self.batch_sizes.append(len(rows))
        self.metrics.batch(len(rows))
        first = rows[0].params
        inputs = self._inputs([r.prompt for r in rows])
        stops = [] if first.ignore_eos else list(self.processor.stop_token_ids)
        decode_started = time.monotonic()
        if first.num_beams > 1:
            from phantom_ray.model.generation import beam_search

            seqs = beam_search(self.model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                               num_beams=first.num_beams, max_new_tokens=first.max_tokens, stop_token_ids=stops,
                               pad_token_id=self.processor.pad_token_id, length_penalty=first.length_penalty)
            for r, (ids, reason) in zip(rows, seqs):
                r.first_token_at = time.monotonic()
                r.add_tokens(ids)  # the stop token (if any) ends the row as in greedy decoding
                if not r.done:
                    r.finish(reason)
        else:
            generators = None
            sampled = any(not r.params.greedy for r in rows)
            if sampled:
                dev = self.model.device
                generators = [None if r.params.greedy else
                              torch.Generator(device=dev).manual_seed(r.params.seed_for(r.key)) for r in rows]

            def on_step(step: int, tokens: torch.Tensor, finished: torch.Tensor) -> None:
                for r, tok in zip(rows, tokens.tolist()):
                    if not r.done:
                        r.add_token(tok)
                if all(r.done for r in rows):
                    raise _BatchDone

            try:
                self.model.generate(
                    inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                    max_new_tokens=max(r.params.max_tokens for r in rows), do_sample=sampled,
                    temperature=[r.params.temperature for r in rows], top_p=[r.params.top_p for r in rows],
                    top_k=first.top_k, stop_token_ids=stops, pad_token_id=self.processor.pad_token_id,
                    generator=generators, stream_callback=on_step)
            except _BatchDone:
                pass
        decode_s = time.monotonic() - decode_started
        for r in rows:
            if not r.done:  # generate ran out of steps without a row-level end (cannot normally happen)
                r.finish("length")
            if r.finish_reason != "cancelled":
                self.metrics.finished(time.monotonic() - r.submitted, r.completion_tokens, decode_s, "ok")


__all__ = ["TorchEngine", "group_key"]
