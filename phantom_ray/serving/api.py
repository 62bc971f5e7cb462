"""The OpenAI-compatible HTTP API (FastAPI), independent of how the models are reached.

``create_api(frontend)`` returns the FastAPI app; ``Frontend`` holds the backends (one per model
name, anything with ``stream(payload) -> async iterator of engine events``). The Serve ingress
(``phantom_ray.serving.app``) plugs in Ray deployment handles; tests can plug in in-process workers.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (a raw prompt, no chat
template; both JSON or server-sent events, ``n`` choices), ``GET /v1/models``,
``GET /v1/models/{model}``, ``GET /metrics`` (Prometheus text: every replica's engine metrics,
labelled per model), ``GET /health``. Every error is OpenAI's error JSON. With API keys configured,
``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>`` (Prometheus: the scrape job's
``authorization``); keys are compared in constant time and never logged.

Defaults follow OpenAI's: ``temperature`` 1.0 (sampling; send 0 for greedy, batch-invariant answers),
``top_p`` 1.0, ``max_tokens`` the model's ``default_max_tokens``. ``ignore_eos`` (vLLM's extension)
generates exactly ``max_tokens`` tokens.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from phantom_ray.serving.config import ServeArgs
from phantom_ray.serving.protocol import (APIError, ChatCompletionRequest, CompletionRequest, ImagePolicy,
                                          completion_payload, max_prompt_chars, reject_unsupported, to_payload,
                                          validation_message)

log = logging.getLogger(__name__)


class Backend(Protocol):
    def stream(self, payload: dict) -> AsyncIterator[dict]: ...


class Frontend:
    """Request policy and routing of one application (shared by all ingress replicas)."""

    def __init__(self, args: ServeArgs, backends: dict[str, Backend], api_keys: list[str] | None = None,
                 on_response=None, metrics=None):
        missing = sorted({m.name for m in args.models} - set(backends))
        if missing:
            raise ValueError(f"no backend for models {missing}")
        self.args = args
        self.backends = backends
        self.api_keys = [k for k in (api_keys or []) if k]
        self.policy = ImagePolicy(
            allowed_prefixes=args.allowed_image_url_prefixes, max_images=args.max_images_per_request,
            max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels,
            fetch_timeout_s=args.image_fetch_timeout_s, allow_private=args.allow_private_image_hosts,
        )
        self.max_body_bytes = args.max_request_bytes or largest_request_bytes(args)
        self.created = int(time.time())
        self.on_response = on_response  # (path, status) after every HTTP response, for metrics
        self.metrics = metrics  # async () -> Prometheus text of every model replica (GET /metrics)

    def check_auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send Authorization: Bearer <key>", "missing_api_key")
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in self.api_keys):
            raise APIError(401, "incorrect API key provided", "invalid_api_key")

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "phantom_ray"}


def largest_request_bytes(args: ServeArgs) -> int:
    """The body size of the largest legitimate request: every allowed image inline as base64, the
    longest prompt text the models take with every character JSON-escaped (``\\uXXXX``: 6 bytes),
    and room for the other fields. Anything larger is refused before it is read."""
    images = args.max_images_per_request * (4 * ((args.max_image_bytes + 2) // 3) + 64)
    text = max(max_prompt_chars(m.max_prompt_tokens) for m in args.models) * 6
    return images + text + 64 * 1024


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes: a declared
    Content-Length is checked first, a chunked body while it streams in."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes, over the limit of {limit}", "request_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _event_error(event: dict) -> APIError:
    return APIError(int(event.get("status", 500)), event.get("message", "error"), event.get("code"))


async def _first_event(frontend: Frontend, model: str, payload: dict):
    """Start the backend stream and wait for its first event (errors before any token become HTTP errors)."""
    stream = frontend.backends[model].stream(payload)
    it = stream.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        raise APIError(500, "the model replica ended the request without an answer", "empty_response") from None
    if first.get("type") == "error":
        raise _event_error(first)
    return first, it


def create_api(frontend: Frontend) -> FastAPI:
    app = FastAPI(title="Phantom OpenAI-compatible API", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        msg, param = validation_message(exc)
        return _error_response(APIError(400, msg, "invalid_request", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return _error_response(APIError(exc.status_code, str(exc.detail), code))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - a replica died or failed: OpenAI's error JSON, details in the log
            log.error("request failed: %s: %s", type(exc).__name__, exc)
            response = _error_response(APIError(500, f"internal error ({type(exc).__name__}); see the server log",
                                                "internal_error"))
        if frontend.on_response is not None:
            frontend.on_response(request.url.path, response.status_code)
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": sorted(frontend.backends)}

    @app.get("/v1/models")
    async def list_models(request: Request):
        frontend.check_auth(request)
        return {"object": "list", "data": [frontend.model_card(m.name) for m in frontend.args.models]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str, request: Request):
        frontend.check_auth(request)
        if model not in frontend.backends:
            raise APIError(404, f"the model {model!r} does not exist", "model_not_found", "model")
        return frontend.model_card(model)

    async def _body(request: Request, request_model):
        frontend.check_auth(request)
        if not _is_json(request.headers.get("content-type", "")):
            raise APIError(415, f"Content-Type must be application/json, got "
                                f"{request.headers.get('content-type') or 'none'!r}", "unsupported_media_type")
        raw = await _read_body(request, frontend.max_body_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", "invalid_json") from exc
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", "invalid_json")
        body = reject_unsupported(body, request_model)
        try:
            req = request_model.model_validate(body)
        except ValidationError as exc:
            msg, param = validation_message(exc)
            raise APIError(400, msg, "invalid_request", param) from exc
        if req.model not in frontend.backends:
            raise APIError(404, f"the model {req.model!r} does not exist; see GET /v1/models",
                           "model_not_found", "model")
        return req, frontend.args.model(req.model)

    async def _answer(req, payload: dict, kind: str):
        first, events = await _first_event(frontend, req.model, payload)
        shape = _Shape(kind, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()),
                       req.model, req.n, payload.get("logprobs") is not None)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(shape, first, events, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(shape, first, events)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req, spec = await _body(request, ChatCompletionRequest)
        payload = await to_payload(req, frontend.policy, spec.max_tokens_limit, spec.default_max_tokens,
                                   spec.max_prompt_tokens)
        return await _answer(req, payload, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req, spec = await _body(request, CompletionRequest)
        payload = completion_payload(req, spec.max_tokens_limit, spec.default_max_tokens, spec.max_prompt_tokens)
        return await _answer(req, payload, "text")

    @app.get("/metrics")
    async def metrics(request: Request):
        frontend.check_auth(request)
        if frontend.metrics is None:
            raise APIError(404, "this server exports no metrics", "not_found")
        return PlainTextResponse(await frontend.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _events(first: dict, rest) -> AsyncIterator[dict]:
    yield first
    async for event in rest:
        yield event


class _Shape:
    """How one response is written: chat (``message``/``delta``) or text completion (``text``)."""

    def __init__(self, kind: str, rid: str, created: int, model: str, n: int, with_logprobs: bool):
        self.kind, self.rid, self.created, self.model, self.n = kind, rid, created, model, n
        self.with_logprobs = with_logprobs
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def logprobs(self, entries: list[dict] | None):
        """Engine logprob entries -> OpenAI's ``logprobs`` of a choice (chat: ``content`` list;
        completions: the legacy parallel lists)."""
        if entries is None:
            return None
        if self.kind == "chat":
            return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode()),
                                 "top_logprobs": [{"token": t["token"], "logprob": t["logprob"],
                                                   "bytes": list(t["token"].encode())} for t in e["top_logprobs"]]}
                                for e in entries], "refusal": None}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": None}

    def choice(self, index: int, text: str, finish_reason: str | None, entries: list[dict] | None) -> dict:
        body = {"index": index}
        if self.kind == "chat":
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["text"] = text
        body["logprobs"] = self.logprobs(entries)
        body["finish_reason"] = finish_reason
        return body

    def chunk(self, choices: list[dict], usage=None) -> str:
        body = {"id": self.rid, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta(self, index: int, text: str | None, finish_reason: str | None, entries=None, role: bool = False) -> dict:
        body: dict = {"index": index}
        if self.kind == "chat":
            body["delta"] = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        else:
            body["text"] = text or ""
        body["logprobs"] = self.logprobs(entries) if entries else None
        body["finish_reason"] = finish_reason
        return body


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _complete(shape: _Shape, first: dict, rest) -> JSONResponse:
    text: dict[int, list[str]] = {i: [] for i in range(shape.n)}
    entries: dict[int, list[dict] | None] = {i: [] if shape.with_logprobs else None for i in range(shape.n)}
    done: dict[int, dict] = {}
    async for event in _events(first, rest):
        if event["type"] == "error":
            raise _event_error(event)
        i = int(event.get("index", 0))
        if event.get("logprobs") and entries[i] is not None:
            entries[i] += event["logprobs"]
        if event["type"] == "delta":
            text[i].append(event["text"])
        elif event["type"] == "done":
            done[i] = event
            if len(done) == shape.n:
                break
    if len(done) < shape.n:
        raise APIError(500, "the model replica ended the request without finishing it", "incomplete_response")
    prompt_tokens = done[0]["prompt_tokens"]
    return JSONResponse({
        "id": shape.rid, "object": shape.object, "created": shape.created, "model": shape.model,
        "choices": [shape.choice(i, "".join(text[i]), done[i]["finish_reason"], entries[i]) for i in range(shape.n)],
        "usage": _usage(prompt_tokens, sum(d["completion_tokens"] for d in done.values())),
    })


async def _sse(shape: _Shape, first: dict, rest, include_usage: bool) -> AsyncIterator[str]:
    if shape.kind == "chat":
        yield shape.chunk([shape.delta(i, None, None, role=True) for i in range(shape.n)])
    done: dict[int, dict] = {}
    try:
        async for event in _events(first, rest):
            if event["type"] == "error":
                yield f"data: {json.dumps(_event_error(event).body())}\n\n"
                break
            i = int(event.get("index", 0))
            if event["type"] == "delta":
                yield shape.chunk([shape.delta(i, event["text"], None, event.get("logprobs"))])
            elif event["type"] == "done":
                done[i] = event
                yield shape.chunk([shape.delta(i, "" if shape.kind == "text" else None, event["finish_reason"],
                                               event.get("logprobs"))])
                if len(done) == shape.n:
                    if include_usage:
                        yield shape.chunk([], usage=_usage(done[0]["prompt_tokens"],
                                                           sum(d["completion_tokens"] for d in done.values())))
                    break
    except APIError as exc:  # raised by a backend mid-stream
        yield f"data: {json.dumps(exc.body())}\n\n"
    except Exception as exc:  # noqa: BLE001 - e.g. the replica died mid-answer: end the stream with an error
        log.error("stream %s failed: %s: %s", shape.rid, type(exc).__name__, exc)
        err = APIError(500, f"internal error ({type(exc).__name__}); see the server log", "internal_error")
        yield f"data: {json.dumps(err.body())}\n\n"
    yield "data: [DONE]\n\n"
