"""One error vocabulary: every reason code, the HTTP status it maps to, the reason an error row
records, and one detail cleaner.

A request or row that cannot be served carries a short reason code (``undecodable_image``,
``too_many_pixels``, ``prompt_exceeds_max_length``, ...) raised by ingest (``ImageError``,
``FetchError``), the processor (``SampleError``) or an engine. Every place that turns such a code into
something a user reads goes through :data:`REASONS`:

* :func:`http_status` / :func:`http_error`: the streamed error of an engine and the HTTP error of the
  server (one answer: an over-size image is a 413 whether the HTTP front or a replica finds it);
* :func:`row_reason`: the ``error`` column of captioning and eval and the ``reason`` of pack's errors
  table (a fetch failure is named by what the user can act on: ``missing_image``, ``unreadable_image``);
* :func:`clean_detail`: the ``error_detail``/``detail`` text (no memory addresses, bounded length), so
  the error rows of two runs over the same input are identical.

No imports from the rest of phantom_ray: every layer may use this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Reason:
    code: str
    status: int              # HTTP status of a request refused for this reason
    http_code: str           # the ``code`` of the HTTP error (several reasons share one)
    row: str                 # what an error row records
    means: str


def _r(code: str, status: int, means: str, http_code: str | None = None, row: str | None = None) -> Reason:
    return Reason(code, status, http_code or code, row or code, means)


REASONS: dict[str, Reason] = {r.code: r for r in (
    # images (phantom_ray.ingest.open_image, phantom_ray.processing.images.load_image)
    _r("empty_image", 400, "0 bytes, or a zero-sized canvas", "invalid_image"),
    _r("image_too_large", 413, "encoded bytes over ImageLimits.max_bytes"),
    _r("too_many_pixels", 413, "declared width x height over ImageLimits.max_pixels (decompression bombs)",
       "image_too_large"),
    _r("bad_aspect_ratio", 400, "over ImageLimits.max_aspect_ratio (200:1)", "invalid_image"),
    _r("unsupported_format", 400, "an image format we do not accept (PDF, EPS, PSD, ICO, ...)", "invalid_image"),
    _r("undecodable_image", 400, "not an image, or truncated/corrupt data", "invalid_image"),
    _r("unreadable_image", 400, "the image file/object exists but cannot be read", "image_fetch_failed"),
    _r("unsupported_input", 400, "an in-memory object that is not an image (Python API)", "invalid_image"),
    # fetches (phantom_ray.ingest.fetch_bytes)
    _r("source_not_allowed", 400, "scheme, host, port or path outside the allowlist/root", "image_url_not_allowed",
       "image_outside_root"),
    _r("address_not_allowed", 400, "resolves to a link-local/metadata, loopback or private address",
       "image_url_not_allowed", "unreadable_image"),
    _r("bad_source", 400, "malformed URL/URI/path", "invalid_image_url", "unreadable_image"),
    _r("invalid_base64", 400, "a data: URI whose payload is not base64", row="unreadable_image"),
    _r("not_found", 400, "no such file/object", "image_fetch_failed", "missing_image"),
    _r("fetch_failed", 400, "network/IO error, HTTP error status, timeout", "image_fetch_failed",
       "unreadable_image"),
    _r("source_too_large", 413, "more bytes than the fetch policy's max_bytes", "image_too_large",
       "image_too_large"),
    # pack (phantom_ray.data.schema)
    _r("missing_image", 400, "image path in the record does not exist under the image root"),
    _r("image_outside_root", 400, "image path resolves outside --image-root ('..', absolute, symlink, other bucket)"),
    _r("malformed_conversation", 400, "turns missing, wrong roles/order, non-string content"),
    _r("empty_answer", 400, "an assistant turn / chosen / rejected answer is empty"),
    _r("malformed_record", 400, "not a JSON object, unparseable line, several images, missing fields"),
    # prompts and settings (phantom_ray.processing, the engines)
    _r("image_count_mismatch", 400, "the number of <image> placeholders differs from the number of images"),
    _r("prompt_exceeds_max_length", 400, "the prompt is longer than the processor's max_length"),
    _r("prompt_too_long", 400, "prompt + max_tokens over the engine's max_model_len"),
    _r("unsupported_parameter", 400, "a setting the engine does not offer (beam search on vllm)"),
    _r("missing_prompt", 400, "captioning: the row's prompt column is empty or not text"),
    # the engine itself
    _r("generation_failed", 500, "the model raised while generating a batch"),
)}


def http_status(reason: str) -> int:
    """HTTP status of a request refused for ``reason`` (an unknown reason is a 400)."""
    r = REASONS.get(reason)
    return r.status if r is not None else 400


def http_error(reason: str) -> tuple[int, str]:
    """(HTTP status, error code) of a request refused for ``reason``: the code of an engine's streamed
    error. 413s carry ``image_too_large``; other reasons keep their own code, so a client reads
    exactly what was wrong (``undecodable_image``, ``prompt_exceeds_max_length``, ...)."""
    status = http_status(reason)
    return status, ("image_too_large" if status == 413 else reason)


def row_reason(reason: str) -> str:
    """The reason an error row records for ``reason`` (pack's errors table, captioning and eval)."""
    r = REASONS.get(reason)
    return r.row if r is not None else reason


ROW_REASONS = tuple(sorted({r.row for r in REASONS.values()}))

_ADDR_RE = re.compile(r"<([A-Za-z_][\w.]*) object at 0x[0-9a-fA-F]+>")
MAX_DETAIL_CHARS = 2000


def clean_detail(text: str) -> str:
    """An error message fit for an error row: memory addresses dropped (``<_io.BytesIO object at
    0x7f..>`` -> ``the image data``; they differ per run, so error tables would not be reproducible,
    and they leak layout), at most :data:`MAX_DETAIL_CHARS` characters."""
    text = _ADDR_RE.sub(lambda m: "the image data" if m.group(1).endswith("BytesIO") else f"<{m.group(1)}>",
                        str(text))
    return re.sub(r" ?\bat 0x[0-9a-fA-F]{6,}\b", "", text)[:MAX_DETAIL_CHARS]


__all__ = ["Reason", "REASONS", "ROW_REASONS", "http_status", "http_error", "row_reason", "clean_detail"]
