"""OpenAI chat-completions protocol: request model, message conversion, image fetching, errors.

Pure Python (pydantic + PIL); no Ray, no FastAPI. The HTTP front (``phantom_ray.serving.api``)
turns a validated ``ChatCompletionRequest`` into the normalised payload the model replicas take:
user content parts become text with ``<image>`` placeholders plus a list of encoded images.

Image URLs: ``data:image/...;base64,...`` always; ``s3://`` and ``http(s)://`` only when the
application's ``allowed_image_url_prefixes`` lists a prefix of the URL. Sizes are checked before any
pixel is decoded: the encoded bytes against ``max_image_bytes`` and the header's width x height
against ``max_image_pixels`` (both 413); undecodable data is a 400.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import urllib.error
import urllib.request
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    429: "rate_limit_error",
    503: "server_overloaded",
}


# ---- request model ---------------------------------------------------------------------------------
class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(BaseModel):
    """A text or image_url part; other types are refused with a 400 naming the type."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completions request that Phantom honours. Unknown fields are
    ignored (as vLLM does); fields that ask for something unsupported (``n`` > 1, tools, logprobs)
    are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extension, for load tests that need fixed-length answers
    ignore_eos: bool = False
    logprobs: bool | None = None
    tools: list[Any] | None = None

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

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tools are not supported")
        return v


def validation_message(exc) -> tuple[str, str | None]:
    """A pydantic ValidationError -> (one-line message, param) in OpenAI's style."""
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": str(exc)}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{param + ': ' if param else ''}{first.get('msg')}{more}", param


# ---- images ----------------------------------------------------------------------------------------
class ImagePolicy(BaseModel):
    allowed_prefixes: list[str] = Field(default_factory=list)
    max_images: int = 4
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    fetch_timeout_s: float = 10.0


def _data_uri(url: str, max_bytes: int, param: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise APIError(400, f"{param}: data URI must be data:image/<format>;base64,<data>", "invalid_image_url", param)
    if len(payload) * 3 // 4 > max_bytes + 3:  # checked before decoding: no allocation for huge payloads
        raise APIError(413, f"{param}: image is about {len(payload) * 3 // 4} bytes, over the limit of {max_bytes}",
                       "image_too_large", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, f"{param}: invalid base64 in data URI ({exc})", "invalid_base64", param) from exc
    if not data:
        raise APIError(400, f"{param}: data URI holds no bytes", "invalid_image", param)
    return data


def _fetch_sync(url: str, max_bytes: int, timeout: float, param: str) -> bytes:
    if url.startswith("s3://"):
        from phantom_ray.storage import read_bytes

        try:
            data = read_bytes(url)
        except (OSError, ValueError) as exc:
            raise APIError(400, f"{param}: cannot read {url}: {exc}", "image_fetch_failed", param) from exc
    else:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - prefix-allowlisted
                data = resp.read(max_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise APIError(400, f"{param}: cannot fetch {url}: {exc}", "image_fetch_failed", param) from exc
    if len(data) > max_bytes:
        raise APIError(413, f"{param}: image is over the limit of {max_bytes} bytes", "image_too_large", param)
    return data


def check_image_header(data: bytes, max_pixels: int, param: str) -> None:
    """Reads only the header: 400 if it is no image, 413 if width x height is over the limit."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
    except Image.DecompressionBombError as exc:
        raise APIError(413, f"{param}: {exc}", "image_too_large", param) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise APIError(400, f"{param}: not a decodable image ({len(data)} bytes)", "invalid_image", param) from exc
    if w * h > max_pixels:
        raise APIError(413, f"{param}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}",
                       "image_too_large", param)


async def load_image_bytes(url: str, policy: ImagePolicy, param: str) -> bytes:
    if url.startswith("data:"):
        data = _data_uri(url, policy.max_bytes, param)
    elif url.startswith(("s3://", "http://", "https://")):
        if not any(url.startswith(p) for p in policy.allowed_prefixes):
            raise APIError(400, f"{param}: image URLs must be data: URIs or start with an allowed prefix "
                                f"({', '.join(policy.allowed_prefixes) or 'none configured'})",
                           "image_url_not_allowed", param)
        data = await asyncio.to_thread(_fetch_sync, url, policy.max_bytes, policy.fetch_timeout_s, param)
    else:
        raise APIError(400, f"{param}: unsupported image URL scheme in {url[:32]!r}", "invalid_image_url", param)
    check_image_header(data, policy.max_pixels, param)
    return data


# ---- conversion ------------------------------------------------------------------------------------
async def to_payload(req: ChatCompletionRequest, policy: ImagePolicy, max_tokens_limit: int,
                     default_max_tokens: int) -> dict:
    """Validated request -> the replica payload (see ``phantom_ray.serving.worker``)."""
    system_parts: list[str] = []
    messages: list[dict] = []
    image_urls: list[tuple[str, str]] = []
    for i, m in enumerate(req.messages):
        param = f"messages.{i}.content"
        if m.role in ("system", "developer"):
            if messages:
                raise APIError(400, f"messages.{i}: a {m.role} message must come before the conversation",
                               "invalid_messages", f"messages.{i}.role")
            system_parts.append(_text_only(m.content, param))
            continue
        if m.content is None:
            raise APIError(400, f"{param}: content is required", "invalid_messages", param)
        if isinstance(m.content, str):
            text = m.content
        elif m.role == "assistant":
            text = _text_only(m.content, param)
        else:
            pieces = []
            for j, part in enumerate(m.content):
                pparam = f"{param}.{j}"
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
    if len(image_urls) > policy.max_images:
        raise APIError(400, f"{len(image_urls)} images in the request, over the limit of {policy.max_images}",
                       "too_many_images", "messages")
    max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
    if max_tokens > max_tokens_limit:
        raise APIError(400, f"max_tokens={max_tokens} is over this model's limit of {max_tokens_limit}",
                       "max_tokens_too_large", "max_tokens")
    images = list(await asyncio.gather(*(load_image_bytes(u, policy, p) for u, p in image_urls)))
    return {
        "messages": messages,
        "system": "\n".join(system_parts) if system_parts else None,
        "images": images,
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "seed": req.seed,
        "stop": list(req.stop or []),
        "ignore_eos": req.ignore_eos,
    }


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
