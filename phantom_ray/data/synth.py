"""Synthetic image-text corpus with a learnable ground truth, in every input layout.

Each image is a plain background (white, black or gray) with 1-3 copies of one coloured shape.
Questions have one-word answers from small closed sets, so accuracy can be compared with chance:

* "What colour is the shape?" -> one of :data:`COLOURS` (chance 1/6)
* "What shape is this?" -> one of :data:`SHAPES` (chance 1/3)
* "How many shapes are there?" -> one of "one", "two", "three" (chance 1/3)
* "Describe the image." -> "Two red circles on a white background."
* text-only: "What is two plus three?" -> "five"
* PO triples: a colour/shape/count question, the right answer as ``chosen`` and a wrong one from
  the same set as ``rejected``.

Written layouts (``layout=None`` writes all five, each in ``<output>/<layout>/``):
``llava`` -> ``synth_llava.json`` + ``images/``, ``jsonl`` -> ``synth_jsonl.jsonl`` + ``images/``,
``parquet`` -> ``synth_parquet.parquet`` (embedded PNG bytes), ``text`` -> ``synth_text.json``,
``triples`` -> ``synth_triples.json`` + ``images/``. The held-out split is the same layout under
``heldout/`` (drawn from a different random stream). Every record also carries its ground truth
(``meta`` / extra parquet columns), which readers ignore.

    phantom-ray data synth --output s3://bucket/synth --num-samples 2000 --layout llava --seed 0
"""

from __future__ import annotations

import io
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from phantom_ray import storage

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
           "yellow": (240, 210, 30), "purple": (140, 50, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
COUNT_WORDS = NUMBER_WORDS[1:4]

QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is this?",
    "count": "How many shapes are there?",
    "caption": "Describe the image.",
}

LAYOUT_FILES = {
    "llava": "synth_llava.json",
    "jsonl": "synth_jsonl.jsonl",
    "parquet": "synth_parquet.parquet",
    "text": "synth_text.json",
    "triples": "synth_triples.json",
}


@dataclass
class SynthImage:
    colour: str
    shape: str
    count: int
    background: str
    png: bytes

    def answer(self, qtype: str) -> str:
        if qtype == "colour":
            return self.colour
        if qtype == "shape":
            return self.shape
        if qtype == "count":
            return COUNT_WORDS[self.count - 1]
        if qtype == "caption":
            noun = self.shape if self.count == 1 else f"{self.shape}s"
            article = "A" if self.count == 1 else COUNT_WORDS[self.count - 1].capitalize()
            return f"{article} {self.colour} {noun} on a {self.background} background."
        raise ValueError(f"unknown question type {qtype!r}")

    @property
    def meta(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "count": self.count, "background": self.background}


def render(colour: str, shape: str, count: int, background: str, size: int = 64,
           rng: random.Random | None = None) -> bytes:
    """PNG bytes of ``count`` non-overlapping ``colour`` ``shape``s on a plain background."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    im = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(im)
    cell = size // 2
    cells = rng.sample([(0, 0), (0, 1), (1, 0), (1, 1)], count)
    for row, col in cells:
        r = rng.randint(max(3, cell // 4), max(4, cell * 2 // 5))
        cx = col * cell + cell // 2 + rng.randint(-(cell // 2 - r), cell // 2 - r)
        cy = row * cell + cell // 2 + rng.randint(-(cell // 2 - r), cell // 2 - r)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def random_image(rng: random.Random, size: int = 64) -> SynthImage:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    count, background = rng.randint(1, 3), rng.choice(list(BACKGROUNDS))
    return SynthImage(colour, shape, count, background, render(colour, shape, count, background, size, rng))


def _wrong(rng: random.Random, qtype: str, right: str) -> str:
    choices = {"colour": list(COLOURS), "shape": list(SHAPES), "count": list(COUNT_WORDS)}[qtype]
    return rng.choice([c for c in choices if c != right])


def _records(layout: str, n: int, rng: random.Random, size: int, split: str):
    """(records, {relative image path: png}) for one split of one layout."""
    records, images = [], {}
    for i in range(n):
        sid = f"{split}-{i:06d}"
        if layout == "text":
            a, b = rng.randint(0, 5), rng.randint(0, 5)
            records.append({"id": sid, "source": "synth",
                            "instruction": f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?",
                            "output": NUMBER_WORDS[a + b], "meta": {"a": a, "b": b}})
            continue
        img = random_image(rng, size)
        rel = f"images/{sid}.png"
        if layout == "triples":
            qtype = rng.choice(["colour", "shape", "count"])
            right = img.answer(qtype)
            images[rel] = img.png
            records.append({"id": sid, "image": rel, "question": QUESTIONS[qtype], "chosen": right,
                            "rejected": _wrong(rng, qtype, right), "meta": {**img.meta, "qtype": qtype}})
            continue
        qtype = rng.choice(list(QUESTIONS))
        question, answer = QUESTIONS[qtype], img.answer(qtype)
        meta = {**img.meta, "qtype": qtype}
        if layout == "llava":
            images[rel] = img.png
            records.append({"id": sid, "image": rel, "meta": meta, "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
        elif layout == "jsonl":
            images[rel] = img.png
            records.append({"id": sid, "image": [rel], "task_name": "synth", "dataset_name": "synth", "meta": meta,
                            "messages": [{"role": "user", "content": f"<|image|>{question}"},
                                         {"role": "assistant", "content": answer}]})
        elif layout == "parquet":
            records.append({"id": sid, "image": {"bytes": img.png, "path": f"{sid}.png"}, "question": question,
                            "answer": answer, **meta})
        else:
            raise ValueError(f"unknown layout {layout!r}")
    return records, images


def _write_split(layout: str, root: str, records: list, images: dict) -> str:
    uri = storage.join(root, LAYOUT_FILES[layout])
    if layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(records), sink, row_group_size=256)
        storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())
    elif layout == "jsonl":
        storage.write_text_atomic(uri, "".join(json.dumps(r) + "\n" for r in records))
    else:
        storage.write_text_atomic(uri, json.dumps(records))
    if images:
        with ThreadPoolExecutor(max_workers=8 if storage.is_s3(root) else 1) as pool:
            list(pool.map(lambda kv: storage.write_bytes_atomic(storage.join(root, kv[0]), kv[1]), images.items()))
    return uri


def synthesize(output: str, num_samples: int = 1000, layout: str | None = None, seed: int = 0,
               image_size: int = 64, heldout_fraction: float = 0.1) -> dict[str, dict[str, str]]:
    """Write the synthetic corpus; returns ``{layout: {"train": uri, "heldout": uri}}``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if layout is not None and layout not in LAYOUT_FILES:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUT_FILES)}")
    layouts = [layout] if layout else list(LAYOUT_FILES)
    n_held = int(round(num_samples * heldout_fraction))
    out = {}
    for k, lay in enumerate(layouts):
        root = output if layout else storage.join(output, lay)
        written = {}
        for split, n, salt in (("train", num_samples, 0), ("heldout", n_held, 1)):
            if n == 0:
                continue
            rng = random.Random(f"{seed}-{lay}-{salt}")
            records, images = _records(lay, n, rng, image_size, split)
            written[split] = _write_split(lay, root if split == "train" else storage.join(root, "heldout"),
                                          records, images)
        out[lay] = written
    return out
