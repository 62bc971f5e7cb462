"""One error vocabulary: reason codes, what HTTP status each maps to, and one detail cleaner.

A request or row that cannot be served carries a short reason code (``undecodable_image``,
``too_many_pixels``, ``prompt_too_long``, ...) raised by ingest, the processor or an engine. Every
place that turns such a code into something a user reads goes through here: the streamed error of
an engine, the HTTP error of the server and the ``error``/``error_detail`` columns of captioning,
eval and packing.
"""

from __future__ import annotations

import re

# reason code -> (HTTP status, the code the HTTP error carries); any other reason is a 400 with its own code
_HTTP = {
    "too_many_pixels": (413, "image_too_large"),
}


def http_error(reason: str) -> tuple[int, str]:
    """(HTTP status, error code) of a request refused for ``reason``."""
    return _HTTP.get(reason, (400, reason))


def clean_detail(text: str) -> str:
    """The message without memory addresses (PIL names ``<BytesIO object at 0x...>``), so that the
    error rows of two runs over the same input are identical."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(text))[:2000]


__all__ = ["http_error", "clean_detail"]
