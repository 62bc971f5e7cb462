"""The one image-ingest function: the bad-image corpus through open_image (what caption and pack
use), the processor (training/serving replicas) and eval's image loader, with the same reasons;
path/S3 confinement; error details free of memory addresses."""

from __future__ import annotations

import base64
import os
import pickle

import pytest
from image_corpus import bad_images, encode, good_images
from PIL import Image

from phantom_ray.ingest import (IMAGE_REASONS, FetchError, FetchPolicy, ImageError, ImageLimits, fetch_bytes,
                                open_image, resolve_s3)
from phantom_ray.ingest import load_image as ingest_load_image
from phantom_ray.processing import ImageError as ProcessingImageError
from phantom_ray.processing import load_image as processing_load_image

BAD = bad_images()
GOOD = good_images()


def test_corpus_covers_the_classes():
    assert len(BAD) >= 12 and len(GOOD) >= 8
    assert {r for _, r in BAD.values()} <= set(IMAGE_REASONS)
    assert ProcessingImageError is ImageError  # one error class, whoever raises it


@pytest.mark.parametrize("name", list(BAD))
def test_bad_image_refused_with_reason_by_every_loader(name):
    data, reason = BAD[name]
    loaders = {
        "ingest.open_image": lambda: open_image(data),
        "processing.load_image": lambda: processing_load_image(data),
        "ingest.load_image": lambda: ingest_load_image(data),
    }
    for where, load in loaders.items():
        with pytest.raises(ImageError) as e:
            load()
        assert e.value.reason == reason, (where, e.value)
        assert " at 0x" not in str(e.value) and "BytesIO" not in str(e.value), (where, str(e.value))


@pytest.mark.parametrize("name", list(GOOD))
def test_awkward_valid_image_is_the_same_rgb_everywhere(name):
    data, size, pixel = GOOD[name]
    a = open_image(data)
    b = processing_load_image(data)
    c = ingest_load_image(data)
    for img in (a, b, c):
        assert img.mode == "RGB" and img.size == size
        assert img.tobytes() == a.tobytes()
    if pixel is not None:
        assert a.getpixel((0, 0)) == pixel


def test_exif_rotation_is_applied():
    data, _, _ = GOOD["exif_rotated_jpeg"]
    assert Image.open(__import__("io").BytesIO(data)).size == (40, 20)  # stored
    assert open_image(data).size == (20, 40)  # shown


def test_limits_are_arguments_and_refuse_before_decoding():
    png = encode(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(ImageError) as e:
        open_image(png, ImageLimits(max_bytes=100))
    assert e.value.reason == "image_too_large"
    with pytest.raises(ImageError) as e:
        open_image(png, ImageLimits(max_pixels=300 * 200 - 1))
    assert e.value.reason == "too_many_pixels" and "300x200" in e.value.detail
    assert open_image(png, ImageLimits(max_pixels=300 * 200)).size == (300, 200)
    with pytest.raises(ImageError) as e:
        open_image(encode(Image.new("RGB", (64, 64)), "PNG"), ImageLimits(formats=("JPEG",)))
    assert e.value.reason == "unsupported_format"


def test_image_error_pickles_with_reason():
    err = pickle.loads(pickle.dumps(ImageError("too_many_pixels", "big")))
    assert isinstance(err, ImageError) and err.reason == "too_many_pixels" and err.detail == "big"


# ---- fetch_bytes: local paths, s3 keys, data URIs -----------------------------------------------

def test_local_paths_confined_to_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"A")
    (tmp_path / "secret.png").write_bytes(b"S")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(tmp_path, root / "sub" / "up")
    policy = FetchPolicy(root=str(root))
    assert fetch_bytes("a.png", policy) == b"A"
    assert fetch_bytes("sub/../a.png", policy) == b"A"
    assert fetch_bytes(str(root / "a.png"), policy) == b"A"  # absolute but inside
    for bad in ["../secret.png", str(tmp_path / "secret.png"), "link.png", "sub/up/secret.png",
                "sub/../../secret.png", f"file://{tmp_path}/secret.png", "/etc/passwd"]:
        with pytest.raises(FetchError) as e:
            fetch_bytes(bad, policy)
        assert e.value.reason == "source_not_allowed", bad
        assert "outside the image root" in e.value.message
    with pytest.raises(FetchError) as e:
        fetch_bytes("missing.png", policy)
    assert e.value.reason == "not_found"
    with pytest.raises(FetchError) as e:
        fetch_bytes("a.png", FetchPolicy(root=str(root), allow_local=False))
    assert e.value.reason == "source_not_allowed"


@pytest.mark.parametrize("source,ok", [
    ("a.png", True), ("sub/b.png", True), ("s3://bkt/imgs/a.png", True),
    ("../other/a.png", False), ("sub/../../x.png", False), ("s3://other/imgs/a.png", False),
    ("s3://bkt/imgsX/a.png", False), ("s3://bkt/imgs/../secret.png", False), ("/abs/a.png", False),
    ("s3://bkt/imgs/%2e%2e/x.png", False), ("s3://bkt/imgs", False), ("http://bkt/imgs/a.png", False),
])
def test_s3_keys_confined_to_prefix(source, ok):
    policy = FetchPolicy(root="s3://bkt/imgs/")
    if ok:
        assert resolve_s3(source, policy).startswith("s3://bkt/imgs/")
    else:
        with pytest.raises(FetchError):
            fetch_bytes(source, policy) if source.startswith("http") else resolve_s3(source, policy)


def test_s3_fetch_reads_inside_and_refuses_outside(s3_bucket):
    from phantom_ray import storage

    storage.write_bytes_atomic(f"{s3_bucket}/imgs/a.png", b"inside")
    storage.write_bytes_atomic(f"{s3_bucket}/secret/b.png", b"outside")
    policy = FetchPolicy(root=f"{s3_bucket}/imgs")
    assert fetch_bytes("a.png", policy) == b"inside"
    for bad in ["../secret/b.png", f"{s3_bucket}/secret/b.png"]:
        with pytest.raises(FetchError) as e:
            fetch_bytes(bad, policy)
        assert e.value.reason == "source_not_allowed"
    with pytest.raises(FetchError) as e:
        fetch_bytes("nope.png", policy)
    assert e.value.reason == "not_found"


def test_data_uris():
    png = encode(Image.new("RGB", (4, 4)), "PNG")
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert fetch_bytes(uri) == png
    for bad, reason in [("data:image/png;base64,@@@", "invalid_base64"), ("data:text/html;base64,PGI+", "bad_source"),
                        ("data:image/png,rawbytes", "bad_source")]:
        with pytest.raises(FetchError) as e:
            fetch_bytes(bad)
        assert e.value.reason == reason
    with pytest.raises(FetchError) as e:
        fetch_bytes(uri, FetchPolicy(max_bytes=10))
    assert e.value.reason == "source_too_large"
    with pytest.raises(FetchError):
        fetch_bytes(uri, FetchPolicy(allow_data=False))
    for scheme in ["ftp://h/x.png", "gopher://h/x", "javascript:alert(1)"]:
        with pytest.raises(FetchError) as e:
            fetch_bytes(scheme)
        assert e.value.reason == "source_not_allowed"
