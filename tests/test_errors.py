"""The one error vocabulary (phantom_ray.errors): every reason code raised anywhere has one entry,
and the engine's streamed error, the HTTP front and the error rows all read it."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from phantom_ray.data.schema import ERROR_REASONS, RowError, row_error_from_fetch
from phantom_ray.errors import REASONS, clean_detail, http_error, http_status, row_reason
from phantom_ray.infer.core import error_event, error_generation
from phantom_ray.ingest import FETCH_REASONS, IMAGE_REASONS, FetchError, ImageError


def test_every_ingest_and_pack_reason_is_in_the_table():
    assert set(IMAGE_REASONS) | set(FETCH_REASONS) | set(ERROR_REASONS) <= set(REASONS)
    # every row reason a fetch or image error becomes is one pack's errors table accepts
    for reason in (*IMAGE_REASONS, *FETCH_REASONS):
        assert row_reason(reason) in ERROR_REASONS, reason
        assert isinstance(row_error_from_fetch(FetchError(reason, "x")), RowError)


@pytest.mark.parametrize("reason", ["image_too_large", "too_many_pixels", "source_too_large"])
def test_an_oversize_image_is_413_in_the_engine_and_at_the_http_front(reason):
    assert http_status(reason) == 413 and http_error(reason) == (413, "image_too_large")
    ev = error_event(ImageError(reason, "big"))
    assert (ev.type, ev.status, ev.code) == ("error", 413, "image_too_large")


def test_the_http_front_uses_the_same_status_as_the_engine(monkeypatch):
    from phantom_ray.serving.protocol import APIError, ImagePolicy, load_image_bytes

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    policy = ImagePolicy(max_pixels=32 * 32)
    import base64

    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(APIError) as e:
        asyncio.run(load_image_bytes(url, policy, "image_url"))
    assert (e.value.status, e.value.code) == http_error("too_many_pixels")
    ev = error_event(ImageError("too_many_pixels", "x"))
    assert (ev.status, ev.code) == (e.value.status, e.value.code)


def test_other_reasons_keep_their_own_code_and_are_400():
    for reason in ("undecodable_image", "prompt_exceeds_max_length", "image_count_mismatch"):
        assert http_error(reason) == (400, reason)
    assert http_status("generation_failed") == 500
    assert http_error("some_new_reason") == (400, "some_new_reason")


def test_fetch_failures_are_recorded_by_what_the_user_can_act_on():
    assert row_reason("not_found") == "missing_image"
    assert row_reason("fetch_failed") == "unreadable_image"
    assert row_reason("source_not_allowed") == "image_outside_root"
    assert row_reason("undecodable_image") == "undecodable_image"


def test_clean_detail_drops_addresses_and_bounds_length():
    text = "cannot identify image file <_io.BytesIO object at 0x7f3a2b1c0d90>; <Foo object at 0xdeadbeef12>"
    assert clean_detail(text) == "cannot identify image file the image data; <Foo>"
    assert clean_detail("x at 0x7f3a2b1c0d90 y") == "x y"
    assert len(clean_detail("a" * 5000)) == 2000
    g = error_generation(ImageError("undecodable_image", "bad <_io.BytesIO object at 0x7f00aa11bb22>"))
    assert g.text is None and g.error == "undecodable_image" and "0x" not in g.error_detail
