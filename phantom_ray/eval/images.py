"""Image references of eval items (local path, s3:// URI or encoded bytes) -> bytes or images.

Images are opened by the one ingest function (:func:`phantom_ray.ingest.load_image`), with the same
limits as pack, caption and serve: a benchmark image that serving would refuse is refused here too,
with the same reason (:class:`phantom_ray.ingest.ImageError`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from phantom_ray.ingest import load_image, read_uri


def image_bytes(ref: Any) -> bytes:
    """Encoded bytes for one image reference: a URI/path is read, bytes pass through."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if isinstance(ref, str):
        return read_uri(ref)
    raise TypeError(f"image reference must be a URI string or bytes, got {type(ref).__name__}")


def concat_horizontally(images: list, margin: int = 10):
    """Side by side on black, vertically centred, ``margin`` px apart: how the original feeds the
    several images of BLINK / MM-Vet-v2 items to a single-image model."""
    from PIL import Image

    if not images:
        raise ValueError("concat_horizontally needs at least one image")
    height = max(im.height for im in images)
    width = sum(im.width for im in images) + margin * (len(images) - 1)
    out = Image.new("RGB", (width, height), (0, 0, 0))
    x = 0
    for im in images:
        out.paste(im, (x, (height - im.height) // 2))
        x += im.width + margin
    return out


def item_image(refs: list):
    """The single image the model gets for an item (None if it has none)."""
    if not refs:
        return None
    images = [load_image(r) for r in refs]
    return images[0] if len(images) == 1 else concat_horizontally(images)


def decode_cell(value: Any, where: str) -> bytes:
    """Image bytes from a parquet/TSV cell: HF ``{"bytes", "path"}`` struct, raw bytes or base64."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 0:
        return bytes(value)
    if isinstance(value, str) and value:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{where}: image cell is neither bytes nor base64 ({exc})") from exc
    raise ValueError(f"{where}: empty image cell")
