"""Readers for the input layouts of the Phantom corpora (seed README, "Gathered Dataset Layout").

=========== ===================================================================================
layout      input
=========== ===================================================================================
``llava``   JSON list of ``{"id", "image": "rel/path.jpg", "conversations": [{"from": "human"|
            "gpt", "value"}]}`` with image paths relative to ``--image-root`` (ShareGPT4V,
            ShareGPT4o, MiniGemini, SMR, ALLaVA-VFLAN). Records without ``image`` are text-only.
``jsonl``   one JSON object per line, ``{"image": "p" or ["p"], "messages": [{"role",
            "content"}]}`` (DocDownstream, DocReason); ``conversations`` is accepted too.
``parquet`` rows with an embedded image (``image``: bytes, or the HF ``{"bytes", "path"}``
            struct) and either ``conversations``/``messages`` or question/answer columns
            (``question|query|instruction|problem`` + ``answer|response|output|solution``):
            GLLaVA, MathVision; MathPlus has no image column (text-only).
``text``    JSON list (or JSONL) of text-only samples: ``conversations`` (ALLaVA-Text) or
            ``instruction`` [+ ``input``] + ``output`` (MathInstruct).
``triples`` JSON list (or JSONL) of PO triples ``{"question", "chosen", "rejected",
            "image": "rel/path" (optional)}`` (``prompt``/``correct``/``incorrect`` accepted).
=========== ===================================================================================

An input URI is one file, or a directory whose top-level files with the layout's suffix are each
read as one source. Parsing never raises for a bad record: it returns a RawRecord with ``error``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from phantom_ray import storage
from phantom_ray.data.schema import RawRecord, RowError, make_sample_id, normalize_conversation, strip_image_tags

LAYOUTS = ("llava", "jsonl", "parquet", "text", "triples")

_SUFFIXES = {
    "llava": (".json",),
    "jsonl": (".jsonl",),
    "parquet": (".parquet",),
    "text": (".json", ".jsonl"),
    "triples": (".json", ".jsonl"),
}
_Q_KEYS = ("question", "query", "instruction", "problem", "prompt")
_A_KEYS = ("answer", "response", "output", "solution")
_CONV_KEYS = ("conversations", "messages", "conversation")
_IMG_KEYS = ("image", "images", "image_bytes", "img")


@dataclass(frozen=True)
class InputFile:
    uri: str
    source: str
    file_key: str  # the file's name, part of every sample id (so ids survive moving the corpus)


def _stem(uri: str) -> str:
    name = storage.basename(uri)
    for suffix in (".jsonl", ".json", ".parquet"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_inputs(input_uri: str, layout: str, source: str | None = None) -> list[InputFile]:
    """The input files of ``input_uri`` for ``layout``; ``source`` overrides the file-stem names."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    files = storage.list_files(input_uri, suffixes=_SUFFIXES[layout])
    base = str(input_uri).rstrip("/")
    # a directory input: only its top-level files (held-out splits live in subdirectories)
    files = [f for f in files if f == base or "/" not in f[len(base) + 1:].replace("\\", "/")]
    if not files:
        raise FileNotFoundError(
            f"no {'/'.join(_SUFFIXES[layout])} files for layout {layout!r} at {input_uri}")
    if source and len(files) > 1:
        raise ValueError(f"--source names one source but {input_uri} holds {len(files)} files")
    return [InputFile(f, source or _stem(f), storage.basename(f)) for f in files]


def default_image_root(input_uri: str) -> str:
    """Images are relative to the directory holding the annotation file (or the input dir)."""
    uri = str(input_uri).rstrip("/")
    if storage.list_files(uri) == [uri]:  # a single file
        return storage.parent(uri)
    return uri


def load_records(f: InputFile, layout: str) -> list:
    """All raw records of a JSON/JSONL file (JSONL: raw line strings, parsed per record later)."""
    text = storage.read_text(f.uri)
    if f.uri.endswith(".jsonl"):
        return [line for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{f.uri}: not valid JSON ({exc}); layout {layout!r} expects a JSON list") from None
    if isinstance(data, dict):  # {"data": [...]} style wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
    if not isinstance(data, list):
        raise ValueError(f"{f.uri}: layout {layout!r} expects a JSON list of records, got {type(data).__name__}")
    return data


def parquet_num_rows(uri: str) -> int:
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(uri)
    with fs.open_input_file(path) as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def parquet_bytes_per_row(uri: str) -> float:
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(uri)
    with fs.open_input_file(path) as fh:
        md = pq.ParquetFile(fh).metadata
        total = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
        return total / max(md.num_rows, 1)


def read_parquet_rows(uri: str, start: int, stop: int) -> list[dict]:
    """Rows ``[start, stop)`` of a parquet file, reading only the row groups that hold them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(uri)
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        md = pf.metadata
        groups, first, offset = [], None, 0
        for i in range(md.num_row_groups):
            n = md.row_group(i).num_rows
            if offset < stop and offset + n > start:
                groups.append(i)
                first = offset if first is None else first
            offset += n
        if not groups:
            return []
        table = pf.read_row_groups(groups)
    table = table.slice(start - first, stop - start)
    return table.to_pylist() if isinstance(table, pa.Table) else []


def _first(obj: dict, keys) -> object:
    for k in keys:
        if k in obj and obj[k] is not None:
            return obj[k]
    return None


def _image_ref(value) -> tuple[bytes | None, str | None]:
    """(bytes, path) from a record's image field: a path, bytes, HF struct, or a 1-element list."""
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return None, None
        if len(value) > 1:
            raise RowError("malformed_record", f"{len(value)} images in one record; one is supported")
        value = value[0]
    if value is None:
        return None, None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, str):
        return (None, value) if value.strip() else (None, None)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), None
        if value.get("path"):
            return None, str(value["path"])
        return None, None
    raise RowError("malformed_record", f"image field has unsupported type {type(value).__name__}")


def _qa_conversation(obj: dict) -> list[dict]:
    question, answer = _first(obj, _Q_KEYS), _first(obj, _A_KEYS)
    if question is None or answer is None:
        raise RowError("malformed_record",
                       f"needs a conversation or question/answer fields; has {sorted(obj)[:12]}")
    if not isinstance(question, str) or not isinstance(answer, str):
        raise RowError("malformed_conversation", "question/answer must be strings")
    extra = obj.get("input")
    if isinstance(extra, str) and extra.strip():
        question = f"{question}\n{extra}"
    return normalize_conversation([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])


def parse_record(layout: str, obj, index: int, f: InputFile) -> RawRecord:
    """One raw record -> RawRecord (``error`` set instead of raising for bad records)."""
    rec = RawRecord(index=index, sample_id=make_sample_id(f.source, f.file_key, index), source=f.source,
                    kind="sft")
    try:
        if isinstance(obj, str):  # a JSONL line
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as exc:
                raise RowError("malformed_record", f"line is not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise RowError("malformed_record", f"record is a {type(obj).__name__}, expected an object")
        if obj.get("id") is not None:
            rec.orig_id = str(obj["id"])
        if layout == "triples":
            question = _first(obj, ("question", "prompt", "query"))
            chosen = _first(obj, ("chosen", "correct", "answer_chosen"))
            rejected = _first(obj, ("rejected", "incorrect", "wrong", "answer_rejected"))
            if question is None or chosen is None or rejected is None:
                raise RowError("malformed_record", f"triple needs question/chosen/rejected; has {sorted(obj)[:12]}")
            if not all(isinstance(x, str) for x in (question, chosen, rejected)):
                raise RowError("malformed_record", "question/chosen/rejected must be strings")
            if not strip_image_tags(question):
                raise RowError("malformed_conversation", "empty question")
            if not chosen.strip() or not rejected.strip():
                raise RowError("empty_answer", "chosen or rejected answer is empty")
            rec.kind = "triple"
            rec.conversations = [{"role": "user", "content": strip_image_tags(question)}]
            rec.chosen, rec.rejected = chosen.strip(), rejected.strip()
            rec.image_bytes, rec.image_path = _image_ref(_first(obj, _IMG_KEYS))
            return rec
        conv = _first(obj, _CONV_KEYS)
        rec.conversations = normalize_conversation(conv) if conv is not None else _qa_conversation(obj)
        if layout != "text":
            rec.image_bytes, rec.image_path = _image_ref(_first(obj, _IMG_KEYS))
        if rec.image_bytes is None and rec.image_path is None:
            rec.kind = "text"
    except RowError as exc:
        rec.error = exc
    return rec
