"""OpenAI chat-completions protocol: request model, message conversion, image fetching, errors.

Pure Python (pydantic + PIL); no Ray, no FastAPI. The HTTP front (``phantom_ray.serving.api``)
turns a validated ``ChatCompletionRequest`` into the normalised payload the model replicas take:
user content parts become text with ``<image>`` placeholders plus a list of encoded images.

Image URLs: ``data:image/...;base64,...`` always; ``s3://`` and ``http(s)://`` only under an entry
of the application's ``allowed_image_url_prefixes``, fetched and decoded by the one ingest function
(:mod:`phantom_ray.ingest`: URL normalisation, per-hop redirect checks, address checks, byte and
time bounds; the same image limits as pack, caption and eval). Over-size images are 413, every
other bad image or URL a 400 naming the reason.

Parameters: every field of OpenAI's request that we honour is in :class:`ChatCompletionRequest`
(``/v1/chat/completions``) or :class:`CompletionRequest` (``/v1/completions``: a raw prompt, no chat
template); a field we do not honour is a 400 (``unsupported_parameter``) unless its value asks for
nothing (``tools: []``, ``echo: false``, ``null``, ...), so a client is never told 200 for
something that was silently ignored. ``n``, ``seed`` and ``stop`` work on every engine;
``logprobs``/``top_logprobs`` and ``response_format`` (``json_object``, ``json_schema``) need the
vllm engine: the torch engine answers them with a 400 naming the engine.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from phantom_ray.errors import REASONS
from phantom_ray.ingest import FetchError, FetchPolicy, ImageError, ImageLimits, fetch_bytes, open_image
from phantom_ray.processing.processor import IMAGE_PLACEHOLDER


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` JSON with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_overloaded",
}


# ---- request model ---------------------------------------------------------------------------------
class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # a hint; Phantom's tiling is always "auto"


class ContentPart(BaseModel):
    """A text or image_url part; other types are refused with a 400 naming the type (their own
    fields are kept so that the type, not a field, is named); extra fields on a text or image_url
    part are refused in ``to_payload``."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # OpenAI: a participant name; accepted and not used (it changes nothing)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


MAX_N = 16  # choices per request (each is a sequence in the engine)
MAX_TOP_LOGPROBS = 20


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def schema_text(self) -> str | None:
        """The JSON schema the answer must validate against (None: free text)."""
        import json

        if self.type == "text":
            return None
        if self.type == "json_object":
            return json.dumps({"type": "object"})
        if self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema with a schema")
        return json.dumps(self.json_schema.json_schema)


class _SamplingFields(BaseModel):
    """Fields both completions endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own abuse tracking; no effect on output
    # vLLM's extension, for load tests that need fixed-length answers
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops


class CompletionRequest(_SamplingFields):
    """OpenAI's (legacy) completions request: a raw prompt, tokenized as it is (no chat template)."""

    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # top k per token (the legacy API's int)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("send one prompt per request (a list of exactly one string)")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v


class ChatCompletionRequest(_SamplingFields):
    """The fields of OpenAI's chat completions request that Phantom honours (everything else is
    refused by :func:`reject_unsupported` before this model sees the body)."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    max_completion_tokens: int | None = Field(None, ge=1)

    def top_k_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "invalid_request", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


# OpenAI request fields we do not implement -> the values that ask for nothing (accepted, dropped).
# Any other value (or any field not listed here nor in ChatCompletionRequest) is a 400.
_NOOP_VALUES: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (True, False),  # meaningless without tools, which are refused
    "modalities": (["text"],),
    "store": (False,),
    "metadata": ({},),
    "service_tier": ("auto", "default"),
    # /v1/completions
    "echo": (False,),
    "suffix": ("",),
    "best_of": (1,),
}
_MESSAGE_NOOP: dict[str, tuple] = {"tool_calls": ([],), "refusal": (), "function_call": (), "audio": ()}


def _is_noop(value, allowed: tuple) -> bool:
    return value is None or any(type(value) is type(a) and value == a for a in allowed) or (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and any(isinstance(a, (int, float)) and not isinstance(a, bool) and value == a for a in allowed))


def reject_unsupported(body: dict, request_model: type[BaseModel] = None) -> dict:
    """400 for every request field we would otherwise ignore; drops the no-op ones. Runs on the raw
    JSON before validation, so the message names the parameter instead of a pydantic error."""
    honoured = set((request_model or ChatCompletionRequest).model_fields)
    out = {}
    for key, value in body.items():
        if key in honoured:
            out[key] = value
        elif key in _NOOP_VALUES and _is_noop(value, _NOOP_VALUES[key]):
            continue
        else:
            raise APIError(400, f"parameter {key!r} is not supported by this server; remove it",
                           "unsupported_parameter", key)
    msgs = out.get("messages")
    if isinstance(msgs, list):
        fields = set(ChatMessage.model_fields)
        cleaned = []
        for i, m in enumerate(msgs):
            if isinstance(m, dict):
                for key in [k for k in m if k not in fields]:
                    if key in _MESSAGE_NOOP and _is_noop(m[key], _MESSAGE_NOOP[key]):
                        m = {k: v for k, v in m.items() if k != key}
                    else:
                        raise APIError(400, f"messages.{i}: field {key!r} is not supported by this server",
                                       "unsupported_parameter", f"messages.{i}.{key}")
            cleaned.append(m)
        out["messages"] = cleaned
    return out


def validation_message(exc) -> tuple[str, str | None]:
    """A pydantic ValidationError -> (one-line message, param) in OpenAI's style."""
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": str(exc)}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{param + ': ' if param else ''}{first.get('msg')}{more}", param


# ---- images ----------------------------------------------------------------------------------------
class ImagePolicy:
    """How the API takes images: fetched by :func:`phantom_ray.ingest.fetch_bytes` under ``fetch``
    (no local paths; ``s3://`` only when an ``s3://`` prefix is allowed) and checked by
    :func:`phantom_ray.ingest.open_image` under ``limits`` (the same limits the replicas apply)."""

    def __init__(self, allowed_prefixes=(), max_images: int = 4, max_bytes: int | None = None,
                 max_pixels: int | None = None, fetch_timeout_s: float = 10.0, allow_private: bool = False):
        limits = ImageLimits()
        self.limits = ImageLimits(max_bytes=max_bytes or limits.max_bytes, max_pixels=max_pixels or limits.max_pixels)
        self.max_images = max_images
        allowed = tuple(allowed_prefixes)
        self.fetch = FetchPolicy(allow_local=False, allow_s3=any(p.startswith("s3://") for p in allowed),
                                 allow_data=True, allowed_urls=allowed, allow_private=allow_private,
                                 max_bytes=self.limits.max_bytes, timeout_s=fetch_timeout_s)

    @property
    def max_bytes(self) -> int:
        return self.limits.max_bytes


def _check_image(data: bytes, limits: ImageLimits) -> None:
    open_image(data, limits)  # the full decode the replica will do: refuse here, with a 4xx


async def load_image_bytes(url: str, policy: ImagePolicy, param: str) -> bytes:
    """The encoded bytes of one image_url, checked as the replicas will decode them."""
    try:
        if url[:5].lower() == "data:":
            data = fetch_bytes(url, policy.fetch)  # no I/O: decode in place
        else:
            data = await asyncio.to_thread(fetch_bytes, url, policy.fetch)
        await asyncio.to_thread(_check_image, data, policy.limits)
    except FetchError as exc:
        reason = REASONS.get(exc.reason)
        status, code = (reason.status, reason.http_code) if reason else (400, "image_fetch_failed")
        if code == "image_url_not_allowed":
            allowed = ", ".join(policy.fetch.allowed_urls) or "none configured"
            msg = f"{param}: {exc.message} (image URLs must be data: URIs or under an allowed prefix: {allowed})"
        else:
            msg = f"{param}: {exc.message}"
        raise APIError(status, msg, code, param) from None
    except ImageError as exc:
        reason = REASONS.get(exc.reason)
        status, code = (reason.status, reason.http_code) if reason else (400, "invalid_image")
        raise APIError(status, f"{param}: {exc.reason}: {exc.message}", code, param) from None
    return data


# ---- conversion ------------------------------------------------------------------------------------
# A cheap bound on prompt text before the replica tokenises it: no tokenizer we serve averages more
# than this many characters per token (long whitespace/punctuation runs merge into tokens of up to
# ~16 characters; 32 leaves room), so more characters than max_prompt_tokens * this cannot fit.
MAX_CHARS_PER_TOKEN = 32


def max_prompt_chars(max_prompt_tokens: int) -> int:
    return max_prompt_tokens * MAX_CHARS_PER_TOKEN


async def to_payload(req: ChatCompletionRequest, policy: ImagePolicy, max_tokens_limit: int,
                     default_max_tokens: int, max_prompt_tokens: int | None = None) -> dict:
    """Validated request -> the replica payload (see ``phantom_ray.serving.worker``). Cheap checks
    (empty content, text length, image count, max_tokens) run before any image is fetched."""
    system_parts: list[str] = []
    messages: list[dict] = []
    image_urls: list[tuple[str, str]] = []
    for i, m in enumerate(req.messages):
        param = f"messages.{i}.content"
        if m.role in ("system", "developer"):
            if m.content == "" or m.content == []:
                raise APIError(400, f"{param}: content is empty; leave the {m.role} message out instead",
                               "empty_content", param)
            if messages:
                raise APIError(400, f"messages.{i}: a {m.role} message must come before the conversation",
                               "invalid_messages", f"messages.{i}.role")
            system_parts.append(_text_only(m.content, param))
            continue
        if m.content is None:
            raise APIError(400, f"{param}: content is required", "invalid_messages", param)
        if m.content == "" or m.content == []:
            raise APIError(400, f"{param}: content is empty; send text or an image", "empty_content", param)
        if isinstance(m.content, str):
            text = m.content
        elif m.role == "assistant":
            text = _text_only(m.content, param)
        else:
            pieces = []
            for j, part in enumerate(m.content):
                pparam = f"{param}.{j}"
                extra = sorted((part.model_extra or {}).keys())
                if part.type in ("text", "image_url") and extra:
                    raise APIError(400, f"{pparam}: field {extra[0]!r} is not supported by this server",
                                   "unsupported_parameter", f"{pparam}.{extra[0]}")
                if part.type == "text":
                    if part.text is None:
                        raise APIError(400, f"{pparam}: text part without text", "invalid_content", pparam)
                    pieces.append(part.text)
                elif part.type == "image_url":
                    if part.image_url is None:
                        raise APIError(400, f"{pparam}: image_url part without image_url", "invalid_content", pparam)
                    image_urls.append((part.image_url.url, f"{pparam}.image_url.url"))
                    pieces.append(IMAGE_PLACEHOLDER)
                else:
                    raise APIError(400, f"{pparam}: unsupported content type {part.type!r} (use text or image_url)",
                                   "unsupported_content_type", f"{pparam}.type")
            text = "".join(pieces)
        messages.append({"role": m.role, "content": text})
    n_chars = sum(len(t) for t in system_parts) + sum(len(m["content"]) for m in messages)
    if max_prompt_tokens is not None and n_chars > max_prompt_chars(max_prompt_tokens):
        raise APIError(400, f"the prompt has {n_chars} characters; this model takes at most {max_prompt_tokens} "
                            f"tokens, which never holds more than {max_prompt_chars(max_prompt_tokens)} characters",
                       "prompt_exceeds_max_length", "messages")
    if len(image_urls) > policy.max_images:
        raise APIError(400, f"{len(image_urls)} images in the request, over the limit of {policy.max_images}",
                       "too_many_images", "messages")
    max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
    if max_tokens > max_tokens_limit:
        raise APIError(400, f"max_tokens={max_tokens} is over this model's limit of {max_tokens_limit}",
                       "max_tokens_too_large", "max_tokens")
    try:
        schema = req.response_format.schema_text() if req.response_format is not None else None
    except ValueError as exc:
        raise APIError(400, str(exc), "invalid_request", "response_format") from None
    top_k = req.top_k_logprobs()
    images = list(await asyncio.gather(*(load_image_bytes(u, policy, p) for u, p in image_urls)))
    return {
        "messages": messages,
        "system": "\n".join(system_parts) if system_parts else None,
        "images": images,
        **_sampling(req, max_tokens),
        "logprobs": top_k,
        "json_schema": schema,
    }


def _sampling(req: _SamplingFields, max_tokens: int) -> dict:
    return {
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "seed": req.seed,
        "stop": list(req.stop or []),
        "ignore_eos": req.ignore_eos,
        "n": req.n,
    }


def completion_payload(req: CompletionRequest, max_tokens_limit: int, default_max_tokens: int,
                       max_prompt_tokens: int | None = None) -> dict:
    """A validated completions request -> the replica payload (raw prompt, text only)."""
    if max_prompt_tokens is not None and len(req.prompt) > max_prompt_chars(max_prompt_tokens):
        raise APIError(400, f"the prompt has {len(req.prompt)} characters; this model takes at most "
                            f"{max_prompt_tokens} tokens, which never holds more than "
                            f"{max_prompt_chars(max_prompt_tokens)} characters", "prompt_exceeds_max_length", "prompt")
    max_tokens = req.max_tokens or default_max_tokens
    if max_tokens > max_tokens_limit:
        raise APIError(400, f"max_tokens={max_tokens} is over this model's limit of {max_tokens_limit}",
                       "max_tokens_too_large", "max_tokens")
    return {"messages": [], "system": None, "images": [], "prompt": req.prompt, **_sampling(req, max_tokens),
            "logprobs": req.logprobs, "json_schema": None}


def _text_only(content, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise APIError(400, f"{param}.{j}: only text parts are allowed here, got {part.type!r}",
                           "unsupported_content_type", f"{param}.{j}.type")
        out.append(part.text)
    return "".join(out)
