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

import base64
import binascii
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from phantom_ray.processing.errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# 8K x 8K. PIL's own decompression-bomb guard is set per process (Image.MAX_IMAGE_PIXELS); ours is a
# per-call argument so a captioning job and a public endpoint can choose different limits.
DEFAULT_MAX_PIXELS = 8192 * 8192
# Same bound as Qwen2-VL's smart_resize: beyond 200:1 a tile grid of <= 6 tiles squeezes the short
# side to a few pixels, so the model sees noise.
DEFAULT_MAX_ASPECT_RATIO = 200.0
# Transparent pixels are composited over white (documents and logos are drawn for a white page).
ALPHA_BACKGROUND = (255, 255, 255)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def load_image(
    src: Any,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    exif_transpose: bool = True,
) -> Image.Image:
    """Return ``src`` as a decoded RGB PIL image, or raise :class:`ImageError`.

    ``src`` may be a PIL image, encoded bytes (JPEG, PNG, WebP, GIF (first frame), BMP, TIFF, ...),
    a ``data:image/...;base64,`` URI, a local path or ``s3://`` URI, or a uint8 tensor / array shaped (3,H,W),
    (H,W,3), (1,H,W), (H,W) or with 4 channels (RGBA). The pixel limit is checked from the file
    header before the pixels are decoded.
    """
    if isinstance(src, Image.Image):
        img = src
        _check_size(img.size, max_pixels, max_aspect_ratio)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        img = _decode(bytes(src), max_pixels, max_aspect_ratio, exif_transpose, what="image bytes")
    elif isinstance(src, (str, Path)):
        s = str(src)
        if s.startswith("data:"):
            img = _decode(_data_uri_bytes(s), max_pixels, max_aspect_ratio, exif_transpose, what="data URI")
        elif s.startswith("s3://"):
            from phantom_ray.storage import read_bytes

            try:
                data = read_bytes(s)
            except (OSError, ValueError) as exc:  # FileNotFoundError for a missing object
                raise ImageError("unreadable_image", f"cannot read image {s!r}: {exc}") from exc
            img = _decode(data, max_pixels, max_aspect_ratio, exif_transpose, what=s)
        else:
            try:
                data = Path(s).read_bytes()
            except OSError as exc:
                raise ImageError("unreadable_image", f"cannot read image file {s!r}: {exc}") from exc
            img = _decode(data, max_pixels, max_aspect_ratio, exif_transpose, what=f"file {s!r}")
    elif isinstance(src, (torch.Tensor, np.ndarray)):
        img = _from_array(src)
        _check_size(img.size, max_pixels, max_aspect_ratio)
    else:
        raise ImageError(
            "unsupported_input",
            f"cannot load an image from {type(src).__name__}; pass a PIL image, bytes, a path, a data URI "
            "or a uint8 tensor",
        )
    return to_rgb(img)


def _data_uri_bytes(uri: str) -> bytes:
    head, _, payload = uri.partition(",")
    if not head.endswith(";base64") or not payload:
        raise ImageError("undecodable_image", f"data URI {head[:40]!r}... is not a base64 image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("undecodable_image", f"data URI has invalid base64: {exc}") from exc


def _check_size(size: tuple[int, int], max_pixels: int, max_aspect_ratio: float | None) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError("empty_image", f"image has zero size ({w}x{h})")
    if max_pixels and w * h > max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (raise max_pixels if intended)",
        )
    if max_aspect_ratio and max(w / h, h / w) > max_aspect_ratio:
        raise ImageError(
            "bad_aspect_ratio",
            f"image is {w}x{h}, aspect ratio {max(w / h, h / w):.1f}:1 is over the limit of {max_aspect_ratio:g}:1",
        )


def _decode(data: bytes, max_pixels: int, max_aspect_ratio: float | None, exif: bool, what: str) -> Image.Image:
    if len(data) == 0:
        raise ImageError("empty_image", f"{what} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # our own limit below replaces PIL's process-wide warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", f"{what}: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(
            "undecodable_image", f"{what} ({len(data)} bytes, starts {data[:8]!r}) is not a readable image: {exc}"
        ) from exc
    _check_size(img.size, max_pixels, max_aspect_ratio)  # from the header, before decoding pixels
    try:
        img.seek(0)  # first frame of animations (GIF, APNG, WebP)
        img.load()
        if exif:
            img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        fmt = img.format or "image"
        raise ImageError("undecodable_image", f"{what}: {fmt} data is corrupt or truncated: {exc}") from exc
    return img


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


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha over white, 16/32-bit and float scaled to 8 bits, CMYK/YCbCr/LAB
    converted by PIL, palette expanded (with its transparency)."""
    if img.size[0] <= 0 or img.size[1] <= 0:
        raise ImageError("empty_image", f"image has zero size {img.size}")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
        mode = "LA"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img))).convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError("unsupported_input", f"cannot convert image mode {mode!r} to RGB: {exc}") from exc


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    hi = float(a.max()) if a.size else 0.0
    if hi <= 1.0 and a.dtype.kind == "f" and float(a.min()) >= 0.0:
        scale = 255.0  # float images in [0, 1]
    elif hi <= 255.0:
        scale = 1.0
    elif hi <= 65535.0:
        scale = 255.0 / 65535.0  # 16-bit
    else:
        scale = 255.0 / hi
    return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Tiling (docs/phantom.md#image-tiling)
# ------------------------------------------------------------------------------------------------

def candidate_grids(min_tiles: int = 1, max_tiles: int = 6) -> list[tuple[int, int]]:
    """(columns, rows) grids with min_tiles <= i*j <= max_tiles, in the reference's order.

    The reference builds a Python set and sorts it by tile count; the sort is stable, so grids with
    the same count keep the set's iteration order. Tuples of small ints hash deterministically in
    CPython, so rebuilding the set the same way reproduces that order exactly (phantom.md#image-tiling)."""
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
