"""A corpus of awkward images: each gets a correct RGB tiling or an ImageError naming the problem."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from helpers import tiny_processor
from image_corpus import encode, png_header_bomb
from PIL import Image

from phantom_ray.processing import ImageError, dynamic_tiles, load_image

torch.set_num_threads(1)


def solid(mode: str, size, color) -> Image.Image:
    return Image.new(mode, size, color)


def good_cases() -> dict[str, tuple[object, tuple[int, int, int]]]:
    """name -> (source, expected RGB of pixel (0,0) after loading)."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    tiff16 = Image.fromarray(np.full((40, 50), 65535, dtype=np.uint16))  # I;16, full white
    assert tiff16.mode.startswith("I;16")
    pal = Image.new("P", (30, 30), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (10, 10, 20, 20))  # blue square on index 0 (red), index 0 transparent
    gif_frames = [solid("RGB", (20, 20), (255, 0, 0)), solid("RGB", (20, 20), (0, 0, 255))]
    gif = io.BytesIO()
    gif_frames[0].save(gif, format="GIF", save_all=True, append_images=gif_frames[1:], duration=100, loop=0)
    rgba = solid("RGBA", (20, 30), (0, 255, 0, 0))  # fully transparent green -> white background
    la = solid("LA", (20, 30), (50, 255))
    arr = np.zeros((24, 32, 3), dtype=np.uint8)
    arr[..., 0] = 200
    return {
        "jpeg": (encode(photo, "JPEG", quality=95), None),
        "png": (encode(photo, "PNG"), tuple(int(x) for x in np.asarray(photo)[0, 0])),
        "webp_lossless": (encode(photo, "WEBP", lossless=True), tuple(int(x) for x in np.asarray(photo)[0, 0])),
        "bmp": (encode(photo, "BMP"), tuple(int(x) for x in np.asarray(photo)[0, 0])),
        "tiff_16bit": (encode(tiff16, "TIFF"), (255, 255, 255)),
        "cmyk_jpeg": (encode(solid("CMYK", (32, 32), (255, 0, 0, 0)), "JPEG", quality=100), (0, 255, 255)),
        "palette_png_transparency": (encode(pal, "PNG", transparency=0), (255, 255, 255)),
        "animated_gif_first_frame": (gif.getvalue(), (255, 0, 0)),
        "rgba_png": (encode(rgba, "PNG"), (255, 255, 255)),
        "la_png": (encode(la, "PNG"), (50, 50, 50)),
        "grey_jpeg": (encode(solid("L", (30, 20), 128), "JPEG", quality=100), (128, 128, 128)),
        "tensor_chw": (torch.from_numpy(arr).permute(2, 0, 1).contiguous(), (200, 0, 0)),
        "array_hwc": (arr, (200, 0, 0)),
        "data_uri": ("data:image/png;base64," + base64.b64encode(encode(photo, "PNG")).decode(),
                     tuple(int(x) for x in np.asarray(photo)[0, 0])),
    }


@pytest.mark.parametrize("name", list(good_cases()))
def test_awkward_but_valid_images_tile_to_rgb(name):
    src, want = good_cases()[name]
    img = load_image(src)
    assert img.mode == "RGB"
    if want is not None:
        got = img.getpixel((0, 0))
        assert max(abs(a - b) for a, b in zip(got, want)) <= 2, (got, want)
    tiles = dynamic_tiles(src)
    assert tiles and all(t.mode == "RGB" and t.size == (448, 448) for t in tiles)


def test_palette_transparency_keeps_opaque_colours():
    img = load_image(good_cases()["palette_png_transparency"][0])
    assert img.getpixel((15, 15)) == (0, 0, 255)
    assert img.getpixel((0, 0)) == (255, 255, 255)


BAD = {
    "truncated_jpeg": (lambda: encode(Image.fromarray(np.random.default_rng(1).integers(
        0, 256, (200, 300, 3), dtype=np.uint8)), "JPEG")[:3000], {}, "undecodable_image", "truncated"),
    "zero_byte_file": (lambda: b"", {}, "empty_image", "0 bytes"),
    "garbage_bytes": (lambda: b"this is not an image at all", {}, "undecodable_image", "not a readable image"),
    "png_1x40000": (lambda: encode(Image.new("L", (1, 40000), 255), "PNG"), {}, "bad_aspect_ratio", "40000"),
    "over_pixel_limit": (lambda: encode(Image.new("RGB", (1200, 1000)), "PNG"), {"max_pixels": 1_000_000},
                         "too_many_pixels", "1200x1000"),
    "bomb_header_9000x9000": (lambda: png_header_bomb(9000, 9000), {}, "too_many_pixels", "9000x9000"),
    "bomb_header_60000x60000": (lambda: png_header_bomb(60000, 60000), {}, "too_many_pixels", ""),
    "zero_size_pil": (lambda: Image.new("RGB", (0, 5)), {}, "empty_image", "zero size"),
    "float_tensor": (lambda: torch.rand(3, 8, 8), {}, "unsupported_input", "uint8"),
    "bad_data_uri": (lambda: "data:image/png;base64,@@@", {}, "undecodable_image", "base64"),
    "missing_file": (lambda: "/nonexistent/dir/img.png", {}, "unreadable_image", "img.png"),
    "not_an_image_type": (lambda: 12345, {}, "unsupported_input", "int"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_images_raise_clear_errors(name):
    make, kw, reason, words = BAD[name]
    with pytest.raises(ImageError) as e:
        load_image(make(), **kw)
    assert e.value.reason == reason
    assert words in str(e.value)


def test_aspect_ratio_limit_is_configurable():
    tall = encode(Image.new("L", (1, 40000), 255), "PNG")
    tiles = dynamic_tiles(load_image(tall, max_aspect_ratio=None))
    assert len(tiles) == 7  # (1,6) grid + thumbnail


def test_processor_reports_bad_images_and_keeps_working():
    proc = tiny_processor("tiny-qwen2", max_pixels=1_000_000)
    conv = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A red circle."}]
    reasons = []
    for name, (make, _, _, _) in BAD.items():
        try:
            proc.encode(conv, images=make())
        except ImageError as exc:
            reasons.append(exc.reason)
    assert reasons == [reason for _, _, reason, _ in BAD.values()]
    for name, (src, _) in good_cases().items():
        s = proc.encode(conv, images=src)
        assert s.pixel_values.shape[1:] == (3, 32, 32)
        assert int((s.input_ids == proc.image_token_id).sum()) == sum(s.num_tiles) * proc.config.num_image_token


def test_tensor_layouts_agree():
    arr = np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    a = np.asarray(load_image(torch.from_numpy(arr).permute(2, 0, 1)))
    b = np.asarray(load_image(torch.from_numpy(arr)))
    assert np.array_equal(a, arr) and np.array_equal(b, arr)
    grey = np.asarray(load_image(torch.from_numpy(arr[..., 0])))
    assert grey.shape == (20, 30, 3) and np.array_equal(grey[..., 1], arr[..., 0])


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(img, "JPEG", exif=exif.tobytes())
    assert load_image(data).size == (20, 40)
    assert load_image(data, exif_transpose=False).size == (40, 20)
