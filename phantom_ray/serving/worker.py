"""One model's replica logic, without Ray: an engine over the checkpoint, answering requests.

``ModelWorker`` is what each Serve model deployment wraps (``phantom_ray.serving.app``); tests and
``bench/`` can also drive it in-process. It holds one :class:`phantom_ray.infer.api.Engine`
(``load_engine(spec.checkpoint, backend=spec.engine, ...)``), which batches concurrent requests.
Its input is the normalised request that the HTTP front builds (the dict
:func:`phantom_ray.serving.protocol.to_payload` returns):

    {"messages": [{"role": "user"|"assistant", "content": "text with <image> placeholders"}],
     "system": str | None, "images": [encoded image bytes, one per placeholder],
     "max_tokens": int, "temperature": float, "top_p": float, "seed": int | None,
     "stop": [str], "ignore_eos": bool,
     "n": int (choices, default 1), "logprobs": int | None (top k per token; None: off),
     "json_schema": str | None (JSON schema text), "prompt": str | None (a raw completion prompt:
     no template, ``messages`` empty)}

and its output the engine's events as dicts, each with the ``index`` of its choice:
``{"type": "delta", "text", "logprobs"?}`` pieces, then per choice one ``{"type": "done",
"finish_reason", "prompt_tokens", "completion_tokens"}``, or one ``{"type": "error", "status",
"code", "message"}`` that ends the whole request.

``n > 1`` runs the n choices as n requests of the same engine, at once (they share batches; vLLM's
prefix cache holds their common prompt once), each with its own sampling key: a seeded request
gives the same n choices on every engine start, an unseeded one fresh ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator

import torch

from phantom_ray.infer.api import Event, Request, SamplingParams, default_backend, load_engine
from phantom_ray.serving.config import ModelSpec
from phantom_ray.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


def event_dict(event: Event, index: int = 0) -> dict:
    """An engine event in the shape the HTTP front reads (and Serve streams between processes)."""
    if event.type == "error":
        return {"type": "error", "status": event.status, "code": event.code, "message": event.message}
    if event.type == "delta":
        out = {"type": "delta", "index": index, "text": event.text}
    else:
        out = {"type": "done", "index": index, "finish_reason": event.finish_reason,
               "prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}
    if event.logprobs:
        out["logprobs"] = event.logprobs
    return out


async def _merge(streams: list) -> AsyncIterator[tuple[int, Event]]:
    """(index, event) of several event streams as they come; closing this closes them all."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream) -> None:
        try:
            async for event in stream:
                await queue.put((i, event))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put((i, exc))
        finally:
            await queue.put((i, end))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    running = len(tasks)
    try:
        while running:
            i, item = await queue.get()
            if item is end:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class ModelWorker:
    """Holds one model's engine and answers normalised generation payloads with engine events."""

    def __init__(self, spec: ModelSpec | dict, max_image_pixels: int | None = None, use_ray_metrics: bool = False,
                 model=None, tokenizer=None):
        self.spec = spec if isinstance(spec, ModelSpec) else ModelSpec.model_validate(spec)
        threads = self.spec.torch_num_threads or max(1, int(self.spec.num_cpus))
        torch.set_num_threads(threads)
        device = "cuda" if self.spec.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if self.spec.num_gpus > 0 and device == "cpu":
            log.warning("model %r asks for num_gpus=%s but CUDA is unavailable; running on CPU",
                        self.spec.name, self.spec.num_gpus)
        self.metrics = ServingMetrics(self.spec.name, use_ray=use_ray_metrics)
        backend = self.spec.engine if self.spec.engine != "auto" else default_backend()
        options = dict(max_length=self.spec.max_prompt_tokens, max_pixels=max_image_pixels,
                       max_batch_size=self.spec.max_batch_size)
        if backend == "torch":
            options.update(batch_wait_timeout_s=self.spec.batch_wait_timeout_s, metrics=self.metrics)
        else:  # vllm: continuous batching inside vLLM's async engine; its engine arguments from the spec
            options.update(self.spec.engine_options(), metrics=self.metrics)
        if model is not None:  # an in-memory model (tests, benchmarks): the torch engine over it
            from phantom_ray.infer.torch_engine import TorchEngine
            from phantom_ray.processing import PhantomProcessor

            if tokenizer is None:
                raise ValueError("pass tokenizer together with model")
            kw = {} if max_image_pixels is None else {"max_pixels": max_image_pixels}
            processor = PhantomProcessor(model.config, tokenizer, max_length=self.spec.max_prompt_tokens, **kw)
            self.engine = TorchEngine(model, tokenizer, processor, model_id=self.spec.checkpoint,
                                      max_batch_size=self.spec.max_batch_size,
                                      batch_wait_timeout_s=self.spec.batch_wait_timeout_s, metrics=self.metrics)
        else:
            if self.spec.is_preset:
                log.warning("model %r: checkpoint %r is a preset name; serving RANDOMLY INITIALISED weights "
                            "(seed %d)", self.spec.name, self.spec.checkpoint, self.spec.seed)
            self.engine = load_engine(self.spec.checkpoint, backend=backend, device=device, dtype=self.spec.dtype,
                                      attn_implementation=self.spec.attn_implementation, seed=self.spec.seed,
                                      **options)
        self.model = getattr(self.engine, "model", None)  # torch backend: the model itself (tests, exports)
        self.processor = getattr(self.engine, "processor", None)
        self.created = int(time.time())

    def request(self, payload: dict, index: int = 0) -> Request:
        """The engine request of a payload (choice ``index``); raises ValueError for out-of-range
        sampling settings."""
        max_tokens = payload.get("max_tokens") or self.spec.default_max_tokens
        seed = payload.get("seed")
        params = SamplingParams(
            max_tokens=min(int(max_tokens), self.spec.max_tokens_limit),
            temperature=float(payload.get("temperature", 0.0) or 0.0),
            top_p=float(payload.get("top_p", 1.0) if payload.get("top_p") is not None else 1.0),
            seed=seed,
            stop=tuple(payload.get("stop") or ()),
            ignore_eos=bool(payload.get("ignore_eos", False)),
            logprobs=payload.get("logprobs"),
            json_schema=payload.get("json_schema"),
        )
        # a seeded request is reproducible from its seed alone (key "", or the choice's index);
        # an unseeded one gets fresh randomness from a unique key
        key = ("" if index == 0 else f"choice-{index}") if seed is not None else uuid.uuid4().hex
        return Request(messages=list(payload.get("messages") or []), images=list(payload.get("images") or []),
                       params=params, system=payload.get("system"), key=key, prompt=payload.get("prompt"))

    async def generate(self, payload: dict) -> AsyncIterator[dict]:
        n = int(payload.get("n") or 1)
        try:
            requests = [self.request(payload, i) for i in range(n)]
        except ValueError as exc:
            self.metrics.rejected("error")
            yield {"type": "error", "status": 400, "code": "invalid_request", "message": f"invalid request: {exc}"}
            return
        if n == 1:
            async for event in self.engine.stream(requests[0]):
                yield event_dict(event)
            return
        streams = [self.engine.stream(r) for r in requests]
        merged = _merge(streams)
        try:
            async for i, event in merged:
                yield event_dict(event, i)
                if event.type == "error":  # the same prompt fails the same way in every choice
                    return
        finally:
            await merged.aclose()

    def metrics_text(self) -> str:
        """This replica's metrics in Prometheus' text format: ours (``phantom_*``, every engine) and,
        on the vllm engine, vLLM's own engine metrics (``vllm:*``), labelled with the model name."""
        return self.metrics.prometheus_text(engine_metrics=getattr(self.engine, "backend", None) == "vllm")

    def stats(self) -> dict:
        return self.metrics.snapshot()

    def close(self) -> None:
        """Stop the engine (the vLLM engine-core process with it); idempotent."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()
