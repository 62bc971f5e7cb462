"""A corpus of bad and awkward image files, generated in memory (no fixtures on disk).

``bad_images()``: name -> (bytes, reason) that every entry point must refuse with that reason
(:data:`phantom_ray.ingest.IMAGE_REASONS`). ``good_images()``: name -> (bytes, (w, h), rgb of pixel
(0, 0)) that every entry point must accept as that RGB image. The classes: truncated, empty, random
bytes, decompression bombs (PNG real and header-only, JPEG, GIF), non-images with an image name (SVG,
text, HTML), formats PIL knows but we refuse (EPS), extreme aspect ratios both ways; and valid but
awkward: CMYK, 16-bit, palette with transparency, animated GIF, EXIF-rotated, RGBA, greyscale+alpha,
WebP, BMP, a 200:1 strip (the limit itself).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 10_000) -> bytes:
    """A real, complete 1-bit PNG of side x side black pixels: ~12 KB on disk, 100 M pixels decoded."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_header_bomb(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) \
        + _png_chunk(b"IEND", b"")


def jpeg_bomb(w: int = 60_000, h: int = 60_000) -> bytes:
    """A small valid JPEG whose frame header (SOF0) is patched to declare w x h."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (10, 20, 30)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, h, w)
    return bytes(data)


def gif_bomb(w: int = 30_000, h: int = 30_000) -> bytes:
    """A small GIF whose logical screen and image descriptor declare w x h."""
    data = bytearray(encode(Image.new("P", (8, 8), 0), "GIF"))
    struct.pack_into("<HH", data, 6, w, h)
    desc = data.index(b"\x2c", 13)  # image descriptor: 0x2C, left, top, width, height
    struct.pack_into("<HH", data, desc + 5, w, h)
    return bytes(data)


def exif_rotated() -> bytes:
    """40x20 pixels stored, EXIF orientation 6 (rotate 90): shown as 20x40."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def bad_images() -> dict[str, tuple[bytes, str]]:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    jpeg = encode(photo, "JPEG")
    png = encode(photo, "PNG")
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
           b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")
    return {
        "truncated_jpeg": (jpeg[: len(jpeg) // 3], "undecodable_image"),
        "truncated_png": (png[: len(png) // 2], "undecodable_image"),
        "zero_bytes": (b"", "empty_image"),
        "random_bytes": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "undecodable_image"),
        "png_bomb_real_100mpx": (png_bomb(), "too_many_pixels"),
        "png_bomb_header_9000x9000": (png_header_bomb(9000, 9000), "too_many_pixels"),
        "jpeg_bomb_60000x60000": (jpeg_bomb(), "too_many_pixels"),
        "jpeg_bomb_9000x9000": (jpeg_bomb(9000, 9000), "too_many_pixels"),
        "gif_bomb_30000x30000": (gif_bomb(), "too_many_pixels"),
        "svg_named_jpg": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" '
                          b'height="10"><rect width="10" height="10"/></svg>', "undecodable_image"),
        "text_named_jpg": (b"just some text, saved as photo.jpg\n" * 4, "undecodable_image"),
        "html_named_png": (b"<!DOCTYPE html><html><body>404 not found</body></html>", "undecodable_image"),
        "eps_named_jpg": (eps, "unsupported_format"),
        "aspect_2000x1": (encode(Image.new("L", (2000, 1), 255), "PNG"), "bad_aspect_ratio"),
        "aspect_1x2000": (encode(Image.new("L", (1, 2000), 255), "PNG"), "bad_aspect_ratio"),
        "aspect_4000x3_jpeg": (encode(Image.new("RGB", (4000, 3), (1, 2, 3)), "JPEG"), "bad_aspect_ratio"),
    }


def good_images() -> dict[str, tuple[bytes, tuple[int, int], tuple[int, int, int] | None]]:
    pal = Image.new("P", (30, 30), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (10, 10, 20, 20))
    gif = io.BytesIO()
    frames = [Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "cmyk_jpeg": (encode(Image.new("CMYK", (32, 32), (255, 0, 0, 0)), "JPEG", quality=100), (32, 32), (0, 255, 255)),
        "png_16bit": (encode(Image.fromarray(np.full((40, 50), 65535, dtype=np.uint16)), "PNG"), (50, 40),
                      (255, 255, 255)),
        "palette_transparency": (encode(pal, "PNG", transparency=0), (30, 30), (255, 255, 255)),
        "animated_gif": (gif.getvalue(), (20, 20), (255, 0, 0)),
        "exif_rotated_jpeg": (exif_rotated(), (20, 40), None),
        "rgba_png": (encode(Image.new("RGBA", (20, 30), (0, 255, 0, 0)), "PNG"), (20, 30), (255, 255, 255)),
        "la_png": (encode(Image.new("LA", (20, 30), (50, 255)), "PNG"), (20, 30), (50, 50, 50)),
        "webp": (encode(Image.new("RGB", (24, 24), (0, 0, 255)), "WEBP", lossless=True), (24, 24), (0, 0, 255)),
        "bmp": (encode(Image.new("RGB", (24, 12), (9, 8, 7)), "BMP"), (24, 12), (9, 8, 7)),
        "aspect_200x1_limit": (encode(Image.new("RGB", (400, 2), (0, 128, 0)), "PNG"), (400, 2), (0, 128, 0)),
    }
