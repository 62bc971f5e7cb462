"""The engine core every backend composes: token ids in, text, events and results out.

A backend (``TorchEngine`` here, ``VLLMEngine`` in :mod:`phantom_ray.vllm.engine`) decides how
tokens are produced: our torch model, or vLLM. What the caller sees is decided here, once, so both
backends give the same text and the same events for the same tokens:

* :class:`TextStream`: one request's incremental detokenisation, shaped like vLLM's own
  incremental detokenizer (``vllm/v1/engine/detokenizer.py``): each generated token id goes in
  through :meth:`TextStream.add_token`; the settled new text goes out as a ``delta``
  :class:`~phantom_ray.infer.api.Event`. A trailing incomplete UTF-8 character is held back until
  its bytes complete, and so is a tail that could be the start of a stop string; a stop string
  ends the request (the text before it is the answer). A stop token, the request's ``max_tokens``
  or a cancelled client also end it; :meth:`TextStream.finish` sends the rest and one ``done``.
* :meth:`TextStream.generation`: the whole-result form (:class:`~phantom_ray.infer.api.Generation`).
* :func:`error_generation` / :func:`error_event`: a request that could not be prepared, as a
  result row or as a streamed error (status from the one table in :mod:`phantom_ray.errors`).
* :class:`NullMetrics`: the metrics sink when the caller passes none.

No torch, no vLLM, no Ray here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from phantom_ray.infer.api import Event, Generation, SamplingParams


class NullMetrics:
    """Metrics sink that records nothing (see ``phantom_ray.serving.metrics.ServingMetrics``)."""

    def batch(self, size: int) -> None: ...
    def first_token(self, ttft_s: float) -> None: ...
    def finished(self, latency_s: float, completion_tokens: int, decode_s: float, status: str) -> None: ...
    def rejected(self, status: str) -> None: ...


@dataclass
class TextStream:
    """One request's decoding state: its prompt, settings, generated ids and the text sent so far.

    ``decode`` turns generated ids into text (the processor's ``decode``); ``stop_token_ids`` end the
    request (empty with ``ignore_eos``); ``sink`` (streaming) receives its events; ``metrics``
    records the first token. ``prompt_tokens``/``num_tiles`` describe the prompt for the result."""

    params: SamplingParams
    key: str
    decode: Callable[[list[int]], str]
    stop_token_ids: frozenset[int] = frozenset()
    prompt_tokens: int = 0
    num_tiles: int = 0
    sink: Callable[[Event], None] | None = None
    metrics: object = field(default_factory=NullMetrics)
    prompt: object = None                      # the backend's prompt (a processor Sample)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # filled as tokens arrive
    ids: list[int] = field(default_factory=list)
    emitted: str = ""
    text: str | None = None
    done: bool = False
    finish_reason: str | None = None
    first_token_at: float | None = None
    completion_tokens: int = 0

    def put(self, event: Event) -> None:
        if self.sink is not None:
            self.sink(event)

    # ---- tokens in ---------------------------------------------------------------------------------
    def add_token(self, tok: int) -> None:
        """One generated token id (the stop token included); ends the request where it must."""
        if self.done:
            return
        if self.cancelled:
            self.done, self.finish_reason = True, "cancelled"
            return
        self.completion_tokens += 1
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.metrics.first_token(self.first_token_at - self.submitted)
        if tok in self.stop_token_ids:
            self.finish("stop")
            return
        self.ids.append(tok)
        self._emit()
        if not self.done and self.completion_tokens >= self.params.max_tokens:
            self.finish("length")

    def add_tokens(self, token_ids) -> None:
        """Several token ids in order (a backend that returns them in pieces); stops at the end."""
        for tok in token_ids:
            if self.done:
                break
            self.add_token(int(tok))

    # ---- text out ----------------------------------------------------------------------------------
    def _emit(self) -> None:
        """Send the new, settled part of the text; end the request at a stop string."""
        stops = self.params.stop
        if self.sink is None and not stops:
            return  # nothing to stream and nothing to watch for: decode once at the end
        text = self.decode(self.ids)
        for s in stops:
            k = text.find(s, max(0, len(self.emitted) - len(s) + 1))
            if k >= 0:
                self.finish("stop", text=text[:k])
                return
        safe = len(text)
        while safe > 0 and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 character: wait for its bytes
            safe -= 1
        for s in stops:  # a tail that may grow into a stop string is held back
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[safe - n:safe] == s[:n]:
                    safe -= n
                    break
        self._send(text[:safe])

    def _send(self, text: str) -> None:
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.put(Event(type="delta", text=text[len(self.emitted):]))
            self.emitted = text

    def finish(self, reason: str, text: str | None = None) -> None:
        """End the request: settle its text, send what is left of it and one ``done`` event."""
        if text is None:
            text = self.decode(self.ids)
            for s in self.params.stop:  # a stop string completed by the last token's bytes
                k = text.find(s)
                if k >= 0:
                    text, reason = text[:k], "stop"
        self.text = text
        self._send(text)
        self.done, self.finish_reason = True, reason
        self.put(Event(type="done", finish_reason=reason, prompt_tokens=self.prompt_tokens,
                       completion_tokens=self.completion_tokens))

    def generation(self) -> Generation:
        """The request's whole result (call after it is done)."""
        return Generation(text=self.text, finish_reason=self.finish_reason, prompt_tokens=self.prompt_tokens,
                          completion_tokens=self.completion_tokens, num_tiles=self.num_tiles,
                          latency_s=time.monotonic() - self.submitted)


def error_generation(exc: Exception, num_tiles: int = 0) -> Generation:
    """The error result of a request that could not be prepared (reason code + cleaned detail)."""
    from phantom_ray.errors import clean_detail

    reason = getattr(exc, "reason", None) or type(exc).__name__
    return Generation(text=None, num_tiles=num_tiles, error=reason, error_detail=clean_detail(str(exc)))


def error_event(exc: Exception) -> Event:
    """The streamed error of a request its processor rejected (HTTP status from the one table)."""
    from phantom_ray.errors import http_error
    from phantom_ray.ingest import ImageError  # the same class processing raises

    status, code = http_error(getattr(exc, "reason", None) or type(exc).__name__)
    kind = "image" if isinstance(exc, ImageError) else "request"
    return Event(type="error", status=status, code=code, message=f"invalid {kind}: {getattr(exc, 'message', exc)}")


__all__ = ["TextStream", "NullMetrics", "error_generation", "error_event"]
