"""``VLLMEngine``: the ``vllm`` backend of :mod:`phantom_ray.infer.api` (Phantom as a vLLM model).

Prompts are built by our processor (chat template, tiling), exactly as the torch engine builds
them, and handed to vLLM as token ids (with ``<img></img>`` per image, which vLLM's multimodal
processor expands with the same tiling: see :mod:`phantom_ray.vllm.inputs`). Generated token ids
are turned into text by the engine core both backends compose (:class:`phantom_ray.infer.core.TextStream`:
stop tokens, stop strings, UTF-8 hold-back, streaming deltas), so greedy results are the same text
for both backends.

Why this adapter lives in ``phantom_ray/vllm/`` and not in ``phantom_ray/infer/``: it imports vLLM,
and ``infer`` is the layer below every backend (it never imports ``vllm``). ``load_engine`` finds it
by name through the registry in :mod:`phantom_ray.infer.api` (``"vllm":
"phantom_ray.vllm.engine:VLLMEngine"``), the way vLLM's own ``ModelRegistry`` finds our model.

* :meth:`VLLMEngine.generate`: a batch through ``vllm.LLM`` (continuous batching inside one call).
* :meth:`VLLMEngine.stream`: one request through vLLM's ``AsyncLLM``; concurrent streams share
  batches (continuous batching, prefix caching). ``AsyncLLM`` runs its engine core in a separate
  process, which registers the model through the ``vllm.general_plugins`` entry point: the
  package must be installed (``pip install -e .``), as ``make install`` does.

An engine builds the sync engine on first ``generate`` and the async one on first ``stream`` or
``submit``. Serving uses ``stream``; captioning and eval use :meth:`VLLMEngine.submit` (one request
in, a future of its Generation out, from any thread), so a replica keeps hundreds of requests in
flight in vLLM's continuous batching instead of one blocking ``generate`` per small batch; the async
engine then lives on a background event-loop thread of the engine. ``generate`` (``vllm.LLM``) is
the offline path (benchmarks, ``ask``).

Beyond the torch engine: ``SamplingParams.logprobs`` (each token's logprob and its top k, on the
events) and ``json_schema`` (vLLM's guided decoding, compact JSON). vLLM's engine metrics
(Prometheus, labelled with ``served_model_name``) are recorded in the process that holds the async
engine. Concurrency is vLLM's own (``max_num_seqs``, ``max_num_batched_tokens``; unset: vLLM's
defaults for the device).

Not supported (a clear error per request, never a different answer): beam search
(``num_beams > 1``: use the torch engine). Any first token is served (phantom states per first
token: see :mod:`phantom_ray.vllm.model`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from phantom_ray.infer.api import Event, Generation, Request, SamplingParams
from phantom_ray.infer.core import NullMetrics, TextStream, error_event, error_generation
from phantom_ray.processing import ProcessingError, Sample
from phantom_ray.processing.errors import SampleError
from phantom_ray.vllm.inputs import vllm_prompt

log = logging.getLogger(__name__)


class VLLMEngine:
    backend = "vllm"

    def __init__(self, model_dir: str | Path, processor, *, model_id: str | None = None,
                 engine_args: dict[str, Any] | None = None, metrics=None):
        self.model_dir = str(model_dir)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_id = str(model_id or model_dir)
        self.engine_args = dict(engine_args or {})
        self.metrics = metrics if metrics is not None else NullMetrics()
        self._llm = None
        self._async = None
        self._async_loop: asyncio.AbstractEventLoop | None = None  # the loop the async engine lives on
        self._ids = itertools.count()

    @classmethod
    def load(cls, model_id: str, *, dtype: str | None = "auto", seed: int = 0, max_length: int = 4096,
             max_pixels: int | None = None, max_model_len: int | None = None,
             max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
             served_model_name: str | None = None, gpu_memory_utilization: float | None = None,
             kv_cache_memory_bytes: int | None = None, enable_prefix_caching: bool = True,
             enforce_eager: bool | None = None, metrics=None, vllm_options: dict | None = None,
             **unused) -> "VLLMEngine":
        """``model_id``: a preset (random weights seeded by ``seed``, written once to the cache),
        a checkpoint directory, an ``s3://`` prefix or a hub id (see ``phantom_ray.loader``).
        Concurrency is vLLM's own: ``max_num_seqs`` / ``max_num_batched_tokens`` None leave vLLM's
        defaults for the device (the torch engine's ``max_batch_size`` does not apply and is ignored).
        ``served_model_name`` labels vLLM's metrics (``model_name``). ``vllm_options`` go to vLLM's
        engine arguments unchanged."""
        from phantom_ray.loader import default_device, load_processor, local_model_dir, resolve_dtype

        if unused:
            log.debug("vllm engine ignores options %s", sorted(unused))
        # vLLM reports usage to its stats server (and probes cloud metadata) unless told not to; a
        # deployment that wants it sets VLLM_NO_USAGE_STATS=0 itself
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        d = local_model_dir(model_id, seed=seed)
        processor = load_processor(str(d), max_length, max_pixels)  # the one way to a model's processor
        config = processor.config
        device = default_device()
        on_gpu = device == "cuda"
        args: dict[str, Any] = dict(
            # the one "auto" rule (phantom_ray.loader.resolve_dtype): bfloat16 on CUDA, float32 on CPU
            model=str(d), tokenizer=str(d), dtype=str(resolve_dtype(dtype or "auto", device)).replace("torch.", ""),
            seed=seed, max_model_len=max_model_len or min(max_length, config.llm_config.max_position_embeddings),
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
        )
        if max_num_seqs is not None:
            args["max_num_seqs"] = int(max_num_seqs)
        if max_num_batched_tokens is not None:
            args["max_num_batched_tokens"] = int(max_num_batched_tokens)
        if served_model_name:
            args["served_model_name"] = str(served_model_name)
        if kv_cache_memory_bytes is not None:
            args["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        elif gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = float(gpu_memory_utilization)
        elif not on_gpu:
            # on CPU the fraction is of host RAM, and the default 0.92 refuses to start next to
            # other processes: reserve a fixed KV cache instead
            args["kv_cache_memory_bytes"] = 512 * 2**20
        if "structured_outputs_config" not in (vllm_options or {}):
            from vllm.config import StructuredOutputsConfig

            # JSON answers (response_format) are compact: no free whitespace between tokens, so a
            # model cannot wander off into blank space before its answer closes (llguidance: the broadest
            # JSON-schema coverage of the backends that can compact)
            args["structured_outputs_config"] = StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True)
        args.update(vllm_options or {})
        return cls(d, processor, model_id=str(model_id), engine_args=args, metrics=metrics)

    @property
    def dtype_name(self) -> str:
        return str(self.engine_args.get("dtype", "auto"))

    # ---- engines -----------------------------------------------------------------------------------
    def _sync_engine(self):
        if self._llm is None:
            from vllm import LLM

            from phantom_ray.vllm import register

            register()
            self._llm = LLM(**self.engine_args)
        return self._llm

    def _async_engine(self):
        """vLLM's AsyncLLM, started on the running loop on first use. It belongs to that loop (its
        output task runs there): requests from another running loop are relayed to it (see
        :meth:`stream`, :meth:`submit`); if that loop has ended (an ``asyncio.run`` that returned),
        nothing can be in flight and the engine is started afresh on the current loop."""
        loop = asyncio.get_running_loop()
        if self._async is not None and self._async_loop is not loop and self._async_loop.is_closed():
            self._async.shutdown()
            self._async = None
        if self._async is None:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            from phantom_ray.vllm import register

            register()
            self._async = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args))
            self._async_loop = loop
        return self._async

    def _live_engine_loop(self) -> asyncio.AbstractEventLoop | None:
        """The async engine's loop while it is running (None: no engine yet, or its loop ended)."""
        loop = self._async_loop if self._async is not None else None
        return loop if loop is not None and loop.is_running() else None

    # ---- requests ----------------------------------------------------------------------------------
    def prepare(self, request: Request) -> Sample:
        """Request -> prompt Sample (the torch engine's), checked for what vLLM serves."""
        if request.params.num_beams > 1:
            raise SampleError("unsupported_parameter",
                              "beam search (num_beams > 1) is not available on the vllm engine; use engine torch")
        if request.prompt is not None:
            sample = self.processor.encode_raw(request.prompt)
        else:
            # token ids and tile counts only: vLLM's multimodal processor tiles the images itself
            sample = self.processor.encode(request.messages, images=list(request.images) or None,
                                           system=request.system, add_generation_prompt=True, with_pixels=False)
        sample.labels = None
        if request.params.json_schema is not None:
            self._structured(request.params.json_schema)  # a schema vLLM cannot compile: this request's 400
        max_len = self.engine_args["max_model_len"]
        if len(sample) + request.params.max_tokens > max_len:
            raise SampleError("prompt_too_long",
                              f"prompt ({len(sample)} tokens) + max_tokens ({request.params.max_tokens}) exceeds the "
                              f"engine's max_model_len {max_len}")
        return sample

    def _vllm_params(self, params: SamplingParams, key: str, delta: bool = False):
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        stops = [] if params.ignore_eos else list(self.processor.stop_token_ids)
        structured = self._structured(params.json_schema) if params.json_schema is not None else None
        return VSP(
            max_tokens=params.max_tokens,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=params.top_p, top_k=params.top_k,
            seed=None if params.greedy else params.seed_for(key) % (2**31),
            stop=list(params.stop) or None,
            # our stop tokens only (the tokenizer's eos may differ from the template's end token); a
            # structured answer also ends at the eos its grammar allows once the JSON is complete
            ignore_eos=params.ignore_eos if structured is not None else True, stop_token_ids=stops,
            logprobs=params.logprobs, structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
            detokenize=bool(params.stop),
        )

    @staticmethod
    def _structured(schema_text: str):
        """vLLM's guided decoding for a JSON schema (compact JSON: the engine's
        ``structured_outputs_config``, see :meth:`load`)."""
        import json

        from vllm.sampling_params import StructuredOutputsParams

        try:
            schema = json.loads(schema_text)
        except json.JSONDecodeError as exc:
            raise SampleError("invalid_json_schema", f"response_format schema is not JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise SampleError("invalid_json_schema", "response_format schema must be a JSON object")
        return StructuredOutputsParams(json=schema)

    def _token_text(self, token_id: int) -> str:
        cache = self.__dict__.setdefault("_token_texts", {})
        text = cache.get(token_id)
        if text is None:
            text = cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _logprob_entries(self, token_ids: Sequence[int], logprobs, k: int, stops: frozenset[int]) -> list[dict]:
        """OpenAI-style entries of generated tokens (stop tokens left out, as they are of the text)."""
        out = []
        for tok, lps in zip(token_ids, logprobs or ()):
            tok = int(tok)
            if tok in stops:
                continue
            chosen = lps.get(tok)
            top = sorted(lps.items(), key=lambda kv: kv[1].rank)[:k] if k else []
            out.append({"token_id": tok, "token": self._token_text(tok),
                        "logprob": float(chosen.logprob) if chosen is not None else float("nan"),
                        "top_logprobs": [{"token_id": int(t), "token": self._token_text(int(t)),
                                          "logprob": float(lp.logprob)} for t, lp in top]})
        return out

    def text_stream(self, sample: Sample, params: SamplingParams, key: str, sink=None) -> TextStream:
        """The per-request text stream of a prepared prompt (see :mod:`phantom_ray.infer.core`)."""
        stops = frozenset() if params.ignore_eos else frozenset(self.processor.stop_token_ids)
        return TextStream(params, key, self.processor.decode, stops, prompt_tokens=len(sample),
                          num_tiles=sum(sample.num_tiles), sink=sink, metrics=self.metrics, prompt=sample)

    # ---- batch generation --------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request], **_unused) -> list[Generation]:
        """One Generation per request, in order; a request that cannot be served gives an error row."""
        rows: list[tuple[int, TextStream, list]] = []
        out: list[Generation | None] = [None] * len(requests)
        for i, r in enumerate(requests):
            try:
                sample = self.prepare(r)
            except ProcessingError as exc:
                out[i] = error_generation(exc)
                continue
            rows.append((i, self.text_stream(sample, r.params, r.key or str(i)), list(r.images)))
        if rows:
            llm = self._sync_engine()
            prompts = [vllm_prompt(self.processor, row.prompt, ims) for _, row, ims in rows]
            params = [self._vllm_params(row.params, row.key) for _, row, _ in rows]
            results = llm.generate(prompts, params, use_tqdm=False)
            for (i, row, _), res in zip(rows, results):
                row.add_tokens(res.outputs[0].token_ids)
                if not row.done:
                    row.finish("length")
                out[i] = row.generation()
        return out  # type: ignore[return-value]

    # ---- many requests in flight from synchronous callers (captioning, eval) -------------------------
    def submit(self, request: Request):
        """Start one request on the async engine; returns a ``concurrent.futures.Future`` of its
        :class:`Generation` (an error Generation for a request that cannot be served). Thread-safe:
        the requests of several callers share vLLM's batches."""
        return asyncio.run_coroutine_threadsafe(self._complete(request),
                                                self._live_engine_loop() or self._background_loop())

    def _background_loop(self) -> asyncio.AbstractEventLoop:
        import threading

        with self.__dict__.setdefault("_loop_lock", threading.Lock()):
            loop = self.__dict__.get("_loop")
            if loop is None:
                loop = self._loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="vllm-engine-loop", daemon=True).start()
        return loop

    async def _complete(self, request: Request) -> Generation:
        try:
            # tokenising and the image opening of vllm_prompt off the loop: other requests keep flowing
            sample, prompt = await asyncio.to_thread(self._prepare_prompt, request)
        except ProcessingError as exc:
            return error_generation(exc)
        engine = self._async_engine()
        # the request key as given, "" included: it seeds sampling (SamplingParams.seed_for), so a seeded
        # request must not get a per-call name here (the torch engine does the same)
        row = self.text_stream(sample, request.params, request.key)
        rid = f"phantom-{os.getpid()}-{next(self._ids)}"
        final = None
        async for res in engine.generate(prompt, self._vllm_params(row.params, row.key), rid):
            final = res
        out = final.outputs[0]
        row.add_tokens(out.token_ids)
        if not row.done:
            row.finish("stop" if out.finish_reason == "stop" else "length")
        return row.generation()

    def _prepare_prompt(self, request: Request):
        sample = self.prepare(request)
        return sample, vllm_prompt(self.processor, sample, list(request.images))

    # ---- streaming ---------------------------------------------------------------------------------
    async def stream(self, request: Request) -> AsyncIterator[Event]:
        """Events of one request: ``delta`` pieces, then one ``done`` or one ``error``. Called on the
        loop the engine lives on (a Serve replica's), it runs there; called from another running loop
        (the engine was started by :meth:`submit`), it is relayed through the engine's loop."""
        home = self._live_engine_loop()
        if home is not None and home is not asyncio.get_running_loop():
            async for event in self._relayed(request, home):
                yield event
            return
        async for event in self._stream_here(request):
            yield event

    async def _relayed(self, request: Request, home: asyncio.AbstractEventLoop) -> AsyncIterator[Event]:
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        def put(item) -> None:
            try:
                caller.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop has ended: nobody is listening
                pass

        async def pump() -> None:
            try:
                async for event in self._stream_here(request):
                    put(event)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's loop
                put(exc)
            finally:
                put(end)

        future = asyncio.run_coroutine_threadsafe(pump(), home)
        try:
            while (item := await queue.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not future.done():  # the caller stopped early: cancelling the pump aborts vLLM's request
                future.cancel()

    async def _stream_here(self, request: Request) -> AsyncIterator[Event]:
        try:
            sample = await asyncio.to_thread(self.prepare, request)
        except ProcessingError as exc:
            self.metrics.rejected("error")
            yield error_event(exc)
            return
        engine = self._async_engine()
        events: list[Event] = []
        row = self.text_stream(sample, request.params, request.key, sink=events.append)  # as in _complete
        rid = f"phantom-{os.getpid()}-{next(self._ids)}"
        prompt = vllm_prompt(self.processor, sample, list(request.images))
        vllm_done = False
        want_lp = request.params.logprobs
        pending_lp: list[dict] = []
        try:
            async for res in engine.generate(prompt, self._vllm_params(row.params, row.key, delta=True), rid):
                vllm_done = res.finished
                out = res.outputs[0]
                before = row.completion_tokens
                row.add_tokens(out.token_ids)
                if want_lp is not None:  # the tokens this request took (none past its own end)
                    used = row.completion_tokens - before
                    pending_lp += self._logprob_entries(out.token_ids[:used], (out.logprobs or [])[:used], want_lp,
                                                        row.stop_token_ids)
                if res.finished and not row.done:
                    # vLLM's own stop (the eos a JSON grammar allows once the answer is complete)
                    row.finish("stop" if out.finish_reason == "stop" else "length")
                while events:
                    event = events.pop(0)
                    if want_lp is not None and pending_lp:
                        event.logprobs, pending_lp = pending_lp, []
                    yield event
                if row.done:
                    self.metrics.finished(time.monotonic() - row.submitted, row.completion_tokens, 0.0, "ok")
                    return
        finally:
            if not vllm_done:  # client gone, or our stop string ended the row first: free vLLM's slot
                await engine.abort(rid)

    def close(self) -> None:
        if self._async is not None:
            self._async.shutdown()
            self._async = None
            self._async_loop = None
        loop = self.__dict__.pop("_loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if self._llm is not None:
            llm, self._llm = self._llm, None
            del llm
            import gc

            gc.collect()


__all__ = ["VLLMEngine"]
