"""One model's replica logic, without Ray: load the checkpoint, encode requests, batch-generate.

``ModelWorker`` is what each Serve model deployment wraps (``phantom_ray.serving.app``); tests and
``bench/`` can also drive it in-process. Its input is the normalised request that the HTTP front
builds (``phantom_ray.serving.protocol.GenerationPayload`` as a dict):

    {"messages": [{"role": "user"|"assistant", "content": "text with <image> placeholders"}],
     "system": str | None, "images": [encoded image bytes, one per placeholder],
     "max_tokens": int, "temperature": float, "top_p": float, "seed": int | None,
     "stop": [str], "ignore_eos": bool}

and its output the engine's events (``phantom_ray.serving.engine``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import torch

from phantom_ray.processing import ImageError, PhantomProcessor, ProcessingError, load_tokenizer
from phantom_ray.serving.config import ModelSpec
from phantom_ray.serving.engine import BatchingEngine, GenerationRequest
from phantom_ray.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

# ProcessingError.reason -> HTTP status (everything else a processor rejects is a 400)
_STATUS_BY_REASON = {"too_many_pixels": 413}


def load_model_and_tokenizer(spec: ModelSpec, device: str | torch.device):
    """A preset name gives random weights (a warning says so) and the tiny tokenizer; a directory or
    ``s3://`` prefix gives the exported checkpoint and the tokenizer saved next to it."""
    from phantom_ray.model import PhantomForCausalLM

    dtype = getattr(torch, spec.dtype)
    if spec.is_preset:
        log.warning("model %r: checkpoint %r is a preset name; serving RANDOMLY INITIALISED weights (seed %d)",
                    spec.name, spec.checkpoint, spec.seed)
        model = PhantomForCausalLM.from_preset(spec.checkpoint, attn_implementation=spec.attn_implementation,
                                               seed=spec.seed)
        model = model.to(device=device, dtype=dtype)
        tokenizer = load_tokenizer(spec.checkpoint, model.config)
    else:
        model = PhantomForCausalLM.from_pretrained(spec.checkpoint, dtype=dtype,
                                                   attn_implementation=spec.attn_implementation, device=device)
        tokenizer = load_tokenizer(spec.checkpoint, model.config)
    return model.eval(), tokenizer


class ModelWorker:
    """Loads one model and answers normalised generation payloads with engine events."""

    def __init__(self, spec: ModelSpec | dict, max_image_pixels: int | None = None, use_ray_metrics: bool = False,
                 model=None, tokenizer=None):
        self.spec = spec if isinstance(spec, ModelSpec) else ModelSpec.model_validate(spec)
        threads = self.spec.torch_num_threads or max(1, int(self.spec.num_cpus))
        torch.set_num_threads(threads)
        device = "cuda" if self.spec.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if self.spec.num_gpus > 0 and device == "cpu":
            log.warning("model %r asks for num_gpus=%s but CUDA is unavailable; running on CPU",
                        self.spec.name, self.spec.num_gpus)
        if model is None:
            model, tokenizer = load_model_and_tokenizer(self.spec, device)
        elif tokenizer is None:
            raise ValueError("pass tokenizer together with model")
        self.model = model
        kwargs = {} if max_image_pixels is None else {"max_pixels": max_image_pixels}
        self.processor = PhantomProcessor(model.config, tokenizer, max_length=self.spec.max_prompt_tokens, **kwargs)
        self.metrics = ServingMetrics(self.spec.name, use_ray=use_ray_metrics)
        self.engine = BatchingEngine(model, self.processor, max_batch_size=self.spec.max_batch_size,
                                     batch_wait_timeout_s=self.spec.batch_wait_timeout_s, metrics=self.metrics)
        self.created = int(time.time())

    def encode(self, payload: dict):
        sample = self.processor.encode(payload["messages"], images=payload.get("images") or None,
                                       system=payload.get("system"), add_generation_prompt=True)
        sample.labels = None
        return sample

    async def generate(self, payload: dict) -> AsyncIterator[dict]:
        try:
            # image decoding and tokenisation off the event loop: other requests keep flowing
            sample = await asyncio.to_thread(self.encode, payload)
        except ProcessingError as exc:
            self.metrics.rejected("error")
            status = _STATUS_BY_REASON.get(exc.reason, 400)
            code = "image_too_large" if status == 413 else exc.reason
            kind = "image" if isinstance(exc, ImageError) else "request"
            yield {"type": "error", "status": status, "code": code, "message": f"invalid {kind}: {exc.message}"}
            return
        max_tokens = payload.get("max_tokens") or self.spec.default_max_tokens
        request = GenerationRequest(
            sample=sample,
            max_tokens=min(int(max_tokens), self.spec.max_tokens_limit),
            temperature=float(payload.get("temperature", 0.0) or 0.0),
            top_p=float(payload.get("top_p", 1.0) if payload.get("top_p") is not None else 1.0),
            seed=payload.get("seed"),
            stop=list(payload.get("stop") or []),
            ignore_eos=bool(payload.get("ignore_eos", False)),
        )
        async for event in self.engine.generate(request):
            yield event

    def stats(self) -> dict:
        return self.metrics.snapshot()
