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

An engine builds the sync engine on first ``generate`` and the async one on first ``stream``;
serving uses only ``stream``, captioning and eval only ``generate``.

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
        self._ids = itertools.count()

    @classmethod
    def load(cls, model_id: str, *, dtype: str | None = "auto", seed: int = 0, max_length: int = 4096,
             max_pixels: int | None = None, max_model_len: int | None = None, max_batch_size: int | None = None,
             max_num_seqs: int | None = None, gpu_memory_utilization: float | None = None,
             kv_cache_memory_bytes: int | None = None, enable_prefix_caching: bool = True,
             enforce_eager: bool | None = None, metrics=None, vllm_options: dict | None = None,
             **unused) -> "VLLMEngine":
        """``model_id``: a preset (random weights seeded by ``seed``, written once to the cache),
        a checkpoint directory, an ``s3://`` prefix or a hub id (see ``phantom_ray.loader``).
        ``vllm_options`` go to vLLM's engine arguments unchanged."""
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
        if max_num_seqs or max_batch_size:
            args["max_num_seqs"] = int(max_num_seqs or max_batch_size)
        if kv_cache_memory_bytes is not None:
            args["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        elif gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = float(gpu_memory_utilization)
        elif not on_gpu:
            # on CPU the fraction is of host RAM, and the default 0.92 refuses to start next to
            # other processes: reserve a fixed KV cache instead
            args["kv_cache_memory_bytes"] = 512 * 2**20
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
        if self._async is None:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            from phantom_ray.vllm import register

            register()
            self._async = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args))
        return self._async

    # ---- requests ----------------------------------------------------------------------------------
    def prepare(self, request: Request) -> Sample:
        """Request -> prompt Sample (the torch engine's), checked for what vLLM serves."""
        if request.params.num_beams > 1:
            raise SampleError("unsupported_parameter",
                              "beam search (num_beams > 1) is not available on the vllm engine; use engine torch")
        sample = self.processor.encode(request.messages, images=list(request.images) or None,
                                       system=request.system, add_generation_prompt=True)
        sample.labels = None
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
        return VSP(
            max_tokens=params.max_tokens,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=params.top_p, top_k=params.top_k,
            seed=None if params.greedy else params.seed_for(key) % (2**31),
            stop=list(params.stop) or None,
            # our stop tokens only (the tokenizer's eos may differ from the template's end token)
            ignore_eos=True, stop_token_ids=stops,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
            detokenize=bool(params.stop),
        )

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

    # ---- streaming ---------------------------------------------------------------------------------
    async def stream(self, request: Request) -> AsyncIterator[Event]:
        """Events of one request: ``delta`` pieces, then one ``done`` or one ``error``."""
        try:
            sample = await asyncio.to_thread(self.prepare, request)
        except ProcessingError as exc:
            self.metrics.rejected("error")
            yield error_event(exc)
            return
        engine = self._async_engine()
        events: list[Event] = []
        row = self.text_stream(sample, request.params, request.key or f"stream-{next(self._ids)}", sink=events.append)
        rid = f"phantom-{os.getpid()}-{next(self._ids)}"
        prompt = vllm_prompt(self.processor, sample, list(request.images))
        vllm_done = False
        try:
            async for res in engine.generate(prompt, self._vllm_params(row.params, row.key, delta=True), rid):
                vllm_done = res.finished
                row.add_tokens(res.outputs[0].token_ids)
                if res.finished and not row.done:
                    row.finish("length")
                while events:
                    yield events.pop(0)
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
        if self._llm is not None:
            llm, self._llm = self._llm, None
            del llm
            import gc

            gc.collect()


__all__ = ["VLLMEngine"]
