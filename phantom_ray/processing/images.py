"""Image loading, dynamic tiling and normalisation (docs/phantom.md#image-tiling).

Everything here is pure PIL + numpy + torch: the same code runs in training workers, Ray Data
actors and Serve replicas. Two things differ from the reference on purpose:

* the tiling parameters (tile size, min/max tiles, thumbnail) come from the model config instead of
  being hard-coded (docs/phantom.md#d13-config-fields);
* normalisation works on the whole resized image at once and slices the tiles out of it, instead of
  running ToTensor + Normalize per tile. The tiles are the same pixels (a tile of the resized image
  is a direct crop), so the tensors match the per-tile path to float rounding.

Bad input raises :class:`ImageError` with a short reason code (``undecodable_image``, ``unreadable_image``,
``empty_image``, ``too_many_pixels``, ``bad_aspect_ratio``, ``unsupported_input``) that callers can
write into their error tables as is.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from phantom_ray.ingest import (ALPHA_BACKGROUND, DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS, FetchError,
                                FetchPolicy, ImageError, ImageLimits, fetch_bytes, open_image, to_rgb)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["ALPHA_BACKGROUND", "DEFAULT_MAX_ASPECT_RATIO", "DEFAULT_MAX_PIXELS", "load_image", "to_rgb"]


# ------------------------------------------------------------------------------------------------
# Loading: bytes -> PIL is phantom_ray.ingest.open_image (the one set of limits); this adds the
# in-memory sources (PIL images, tensors) that only the Python API takes.
# ------------------------------------------------------------------------------------------------

def load_image(
    src: Any,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    exif_transpose: bool = True,
) -> Image.Image:
    """Return ``src`` as a decoded RGB PIL image, or raise :class:`ImageError`.

    ``src`` may be a PIL image, encoded bytes (JPEG, PNG, WebP, GIF (first frame), BMP, TIFF),
    a ``data:image/...;base64,`` URI, a local path or ``s3://`` URI (read as given: this is the
    trusted Python API), or a uint8 tensor / array shaped (3,H,W), (H,W,3), (1,H,W), (H,W) or with
    4 channels (RGBA). Encoded bytes go through :func:`phantom_ray.ingest.open_image`.
    """
    limits = ImageLimits(max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
    if isinstance(src, Image.Image):
        img = src
        limits.check_size(img.size)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        img = _open(bytes(src), limits, exif_transpose, "image bytes")
    elif isinstance(src, (str, Path)):
        s = str(src)
        try:
            data = fetch_bytes(s, FetchPolicy(max_bytes=limits.max_bytes))
        except FetchError as exc:
            reason = "undecodable_image" if s.startswith("data:") else "unreadable_image"
            raise ImageError(reason, f"cannot read image {s[:120]!r}: {exc.message}") from None
        img = _open(data, limits, exif_transpose, "data URI" if s.startswith("data:") else f"file {s!r}")
    elif isinstance(src, (torch.Tensor, np.ndarray)):
        img = _from_array(src)
        limits.check_size(img.size)
    else:
        raise ImageError(
            "unsupported_input",
            f"cannot load an image from {type(src).__name__}; pass a PIL image, bytes, a path, a data URI "
            "or a uint8 tensor",
        )
    return to_rgb(img)


def _open(data: bytes, limits: ImageLimits, exif_transpose: bool, what: str) -> Image.Image:
    return open_image(data, limits, what=what, exif_transpose=exif_transpose)


def _from_array(x: torch.Tensor | np.ndarray) -> Image.Image:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype != np.uint8:
        raise ImageError("unsupported_input", f"image tensor must be uint8, got {arr.dtype} with shape {tuple(arr.shape)}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim == 3:
        if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)  # (C,H,W) -> (H,W,C)
        elif arr.shape[0] in (1, 3, 4) and arr.shape[-1] in (1, 3, 4) and arr.shape[0] != arr.shape[-1]:
            # e.g. (3, H, 4): ambiguous only in corner cases; torchvision's (C,H,W) wins
            arr = arr.transpose(1, 2, 0)
        elif arr.shape[-1] not in (1, 3, 4):
            raise ImageError("unsupported_input", f"image tensor shape {tuple(arr.shape)} has no 1/3/4-channel axis")
    else:
        raise ImageError("unsupported_input", f"image tensor must have 2 or 3 dims, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError("empty_image", f"image tensor has zero size {tuple(x.shape)}")
    arr = np.ascontiguousarray(arr)
    c = arr.shape[2]
    # PIL infers L / RGB / RGBA from (H,W) / (H,W,3) / (H,W,4) uint8
    return Image.fromarray(arr[:, :, 0] if c == 1 else arr)


# ------------------------------------------------------------------------------------------------
# Tiling (docs/phantom.md#image-tiling)
# ------------------------------------------------------------------------------------------------

def candidate_grids(min_tiles: int = 1, max_tiles: int = 6) -> list[tuple[int, int]]:
    """(columns, rows) grids with min_tiles <= i*j <= max_tiles, in the reference's order.

    The reference builds a Python set and sorts it by tile count; the sort is stable, so grids with
    the same count keep the set's iteration order. Tuples of small ints hash deterministically in
    CPython, so rebuilding the set the same way reproduces that order exactly (docs/phantom.md#image-tiling)."""
    ratios = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return sorted(ratios, key=lambda x: x[0] * x[1])


def choose_grid(width: int, height: int, image_size: int = 448, min_tiles: int = 1, max_tiles: int = 6,
                grids: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """Closest aspect ratio; exact ties go to the later grid only when the image area exceeds half
    of that grid's canvas (docs/phantom.md#image-tiling)."""
    aspect_ratio = width / height
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for i, j in grids if grids is not None else candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - i / j)
        if diff < best_diff:
            best_diff = diff
            best = (i, j)
        elif diff == best_diff and area > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    return best


def _as_rgb_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    return load_image(image)


def dynamic_tiles(image: Any, image_size: int = 448, min_tiles: int = 1, max_tiles: int = 6,
                  use_thumbnail: bool = True) -> list[Image.Image]:
    """Tiles of ``image`` in row-major order, thumbnail last when there is more than one tile."""
    img = _as_rgb_image(image)
    w, h = img.size
    i, j = choose_grid(w, h, image_size, min_tiles, max_tiles)
    resized = img.resize((image_size * i, image_size * j), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop(((k % i) * image_size, (k // i) * image_size,
                      (k % i + 1) * image_size, (k // i + 1) * image_size))
        for k in range(i * j)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(img.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


class ImageNormalizer:
    """uint8 RGB -> ImageNet-normalised float tensors, computed as x * (1/(255 std)) - mean/std."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        m = torch.tensor(mean, dtype=torch.float32)
        s = torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * s)).view(1, 3, 1, 1)
        self.shift = (m / s).view(1, 3, 1, 1)

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        return out.mul_(self.scale).sub_(self.shift)


_NORMALIZER = ImageNormalizer()


def _split_channels(img: Image.Image) -> list[torch.Tensor]:
    # PIL splits RGB into three contiguous planes faster than numpy transposes (H,W,3).
    return [torch.from_numpy(np.asarray(c)) for c in img.split()]


def tile_pixel_values(image: Any, image_size: int = 448, min_tiles: int = 1, max_tiles: int = 6,
                      use_thumbnail: bool = True) -> torch.Tensor:
    """The normalised tiles of ``image`` as a float32 tensor (num_tiles, 3, image_size, image_size).

    Same pixels as ``dynamic_tiles`` followed by per-tile ToTensor + Normalize, but the image is
    resized once and the tiles are sliced out of its channel planes."""
    img = _as_rgb_image(image)
    w, h = img.size
    i, j = choose_grid(w, h, image_size, min_tiles, max_tiles)
    n = i * j
    thumb = use_thumbnail and n != 1
    s = image_size
    out = torch.empty(n + int(thumb), 3, s, s, dtype=torch.float32)
    resized = img.resize((s * i, s * j), Image.Resampling.BICUBIC)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only numpy view: we only read from it
        planes = _split_channels(resized)
        for k in range(n):
            r, c = divmod(k, i)
            for ch in range(3):
                out[k, ch].copy_(planes[ch][r * s:(r + 1) * s, c * s:(c + 1) * s])
        if thumb:
            for ch, plane in enumerate(_split_channels(img.resize((s, s), Image.Resampling.BICUBIC))):
                out[n, ch].copy_(plane)
    return _NORMALIZER(out)


def tiles_to_tensor(tiles: list[Image.Image]) -> torch.Tensor:
    """Normalise already-cut PIL tiles (all the same square size)."""
    s = tiles[0].size[0]
    out = torch.empty(len(tiles), 3, s, s, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for k, t in enumerate(tiles):
            for ch, plane in enumerate(_split_channels(to_rgb(t))):
                out[k, ch].copy_(plane)
    return _NORMALIZER(out)
