"""The packed row schema, stable sample ids and validation of conversations.

Packed shards (``<output>/shards/*.parquet``) hold one row per usable sample:

=================  ===========  ==========================================================
column             type         meaning
=================  ===========  ==========================================================
``sample_id``      string       stable id: sha256(source + "\\0" + input file + "#" + row)[:24]
``source``         string       corpus name (input file stem unless ``--source`` is given)
``kind``           string       ``"sft"`` (image + conversation), ``"text"`` (no image),
                                ``"triple"`` (PO triple: question, chosen, rejected)
``conversations``  string       JSON list of ``{"role": "system"|"user"|"assistant",
                                "content": str}``; image placeholders (``<image>``,
                                ``<|image|>``) are removed: the image, when present, belongs to
                                the first user turn. For triples: the single user question.
``chosen``         string/null  triples only: the correct answer
``rejected``       string/null  triples only: the incorrect/ambiguous answer
``image``          binary/null  the original encoded image file (PNG/JPEG/...), not re-encoded
``image_sha256``   string/null  sha256 hex of ``image``
``orig_id``        string/null  the record's own ``id`` field when it has one
=================  ===========  ==========================================================

The errors table (``<output>/errors.parquet``) has ``sample_id``, ``source``, ``index`` (row in
its input file), ``reason`` (one of :data:`ERROR_REASONS`) and ``detail`` (human-readable).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import pyarrow as pa

KINDS = ("sft", "text", "triple")

# the reasons pack's errors table records (meanings: the one table, phantom_ray.errors.REASONS)
ERROR_REASONS = ("missing_image", "image_outside_root", "unreadable_image", "undecodable_image", "empty_image",
                 "image_too_large", "too_many_pixels", "bad_aspect_ratio", "unsupported_format",
                 "malformed_conversation", "empty_answer", "malformed_record")

PACKED_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("source", pa.string()),
    ("kind", pa.string()),
    ("conversations", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("image", pa.binary()),
    ("image_sha256", pa.string()),
    ("orig_id", pa.string()),
])

ERRORS_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("source", pa.string()),
    ("index", pa.int64()),
    ("reason", pa.string()),
    ("detail", pa.string()),
])

_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "bot": "assistant", "system": "system"}
_IMAGE_TAG = re.compile(r"<image>|<\|image\|>|<image_placeholder>")


def make_sample_id(source: str, file_key: str, index: int) -> str:
    """Stable id of the ``index``-th record of ``file_key`` in ``source`` (same across re-runs)."""
    return hashlib.sha256(f"{source}\0{file_key}#{index}".encode()).hexdigest()[:24]


class RowError(Exception):
    """A record that cannot be used; ``reason`` is one of :data:`ERROR_REASONS`."""

    def __init__(self, reason: str, detail: str):
        if reason not in ERROR_REASONS:
            raise ValueError(f"unknown error reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def strip_image_tags(text: str) -> str:
    return _IMAGE_TAG.sub("", text).strip()


def normalize_conversation(turns) -> list[dict]:
    """LLaVA ``{"from","value"}`` or OpenAI ``{"role","content"}`` turns -> validated role/content.

    Requires: an optional leading system turn, then user/assistant alternating starting with user,
    ending with an assistant turn; every assistant answer non-empty.
    """
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as exc:
            raise RowError("malformed_conversation", f"conversation is not valid JSON ({exc})") from None
    if not isinstance(turns, (list, tuple)) or not turns:
        raise RowError("malformed_conversation", "conversation must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError("malformed_conversation", f"turn {i} is not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in _ROLE:
            raise RowError("malformed_conversation", f"turn {i} has unknown role {role!r}")
        if not isinstance(content, str):
            raise RowError("malformed_conversation", f"turn {i} content is not a string")
        out.append({"role": _ROLE[role], "content": strip_image_tags(content)})
    body = out[1:] if out[0]["role"] == "system" else out
    if len(body) < 2 or len(body) % 2:
        raise RowError("malformed_conversation",
                       f"need user/assistant pairs, got roles {[t['role'] for t in out]}")
    for i, turn in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != want:
            raise RowError("malformed_conversation",
                           f"turn order must alternate user/assistant, got roles {[t['role'] for t in out]}")
        if want == "assistant" and not turn["content"]:
            raise RowError("empty_answer", f"assistant turn {i} is empty")
        if want == "user" and not turn["content"]:
            raise RowError("malformed_conversation", f"user turn {i} is empty")
    return out


def check_image(data: bytes) -> None:
    """Raise RowError unless ``data`` is an image the ingest function accepts (fully decoded, with
    the one set of limits every entry point uses); the reason is ingest's reason code."""
    from phantom_ray.ingest import ImageError, open_image

    try:
        open_image(data)
    except ImageError as exc:
        raise RowError(exc.reason, exc.message) from None


def row_error_from_fetch(exc) -> "RowError":
    """A :class:`phantom_ray.ingest.FetchError` as the error row's reason (:func:`phantom_ray.errors.row_reason`)."""
    from phantom_ray.errors import row_reason

    return RowError(row_reason(exc.reason), exc.message)


@dataclass
class RawRecord:
    """One input record after layout parsing, before its image is fetched and checked."""

    index: int
    sample_id: str
    source: str
    kind: str
    conversations: list[dict] | None = None
    chosen: str | None = None
    rejected: str | None = None
    image_bytes: bytes | None = None
    image_path: str | None = None  # relative to the image root (or absolute / s3://)
    orig_id: str | None = None
    error: RowError | None = None  # set when parsing already failed


# ---- the one Sample <-> Arrow row codec (processed rows between Ray Data stages) ------------------
# Pixel values travel as raw bytes of a ``pixel_dtype`` array plus its shape: float16 for training
# (half the bytes; the model casts anyway), float32 where outputs are compared with an in-process
# run (eval). Token ids travel as int32 lists.

PIXEL_DTYPES = ("float16", "float32")


def encode_pixels(pixel_values, pixel_dtype: str = "float16") -> tuple[bytes | None, list[int] | None]:
    """A pixel tensor (or None) -> (raw bytes, shape) for an Arrow row."""
    if pixel_dtype not in PIXEL_DTYPES:
        raise ValueError(f"pixel_dtype must be one of {PIXEL_DTYPES}, got {pixel_dtype!r}")
    if pixel_values is None:
        return None, None
    arr = pixel_values.detach().cpu().numpy().astype(pixel_dtype, copy=False)
    return arr.tobytes(), [int(x) for x in arr.shape]


def decode_pixels(data: bytes | None, shape, pixel_dtype: str = "float16"):
    """(raw bytes, shape) from an Arrow row -> a float32 tensor (or None)."""
    import numpy as np
    import torch

    if data is None:
        return None
    arr = np.frombuffer(data, dtype=pixel_dtype).reshape([int(x) for x in shape]).astype(np.float32)
    return torch.from_numpy(arr)


def row_to_sample(input_ids, labels, pixel_values: bytes | None, pixel_shape, num_tiles, pixel_dtype: str = "float16"):
    """Columns of one processed row -> a :class:`phantom_ray.processing.Sample`."""
    import numpy as np
    import torch

    from phantom_ray.processing import Sample

    return Sample(input_ids=torch.as_tensor(np.asarray(input_ids, dtype=np.int64)),
                  labels=torch.as_tensor(np.asarray(labels, dtype=np.int64)) if labels is not None else None,
                  pixel_values=decode_pixels(pixel_values, pixel_shape, pixel_dtype),
                  num_tiles=[int(x) for x in num_tiles])
