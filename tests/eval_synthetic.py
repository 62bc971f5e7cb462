"""Tiny synthetic benchmarks in the original file formats, for end-to-end tests of the eval job.

``write_synthetic_benchmark(root, "pope" | "sqa", n)`` writes the files a real download would put
under ``root`` (local or ``s3://``), with small solid-colour images whose colour encodes the
answer, and returns ``{item id: correct answer text}`` so a test can build a perfect or a
deliberately wrong predictor.
"""

from __future__ import annotations

import json

from helpers import png_bytes

from phantom_ray import storage

SYNTHETIC_BENCHMARKS = ("pope", "sqa")
_COLORS = [("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220)), ("yellow", (230, 220, 20))]


def _write_pope(root: str, n: int) -> dict[str, str]:
    answers = {}
    for s, split in enumerate(("adversarial", "popular", "random")):
        lines = []
        for i in range(n):
            name, rgb = _COLORS[(i + s) % 2]  # red or green
            image = f"COCO_val2014_{s:03d}{i:09d}.jpg"
            storage.write_bytes_atomic(storage.join(root, "coco2014", "val2014", image), png_bytes((32, 32), rgb, "JPEG"))
            label = "yes" if name == "red" else "no"
            lines.append(json.dumps({"question_id": i + 1, "image": image,
                                     "text": "Is the image red?", "label": label}))
            answers[f"{split}/{i + 1}"] = label.capitalize()
        storage.write_text_atomic(storage.join(root, "POPE", f"coco_pope_{split}.json"), "\n".join(lines) + "\n")
    return answers


def _write_sqa(root: str, n: int) -> dict[str, str]:
    problems, test_ids, answers = {}, [], {}
    for i in range(n):
        pid = str(1000 + i)
        k = i % len(_COLORS)
        choices = [c for c, _ in _COLORS]
        problems[pid] = {"question": "Which colour is the picture?", "choices": choices, "answer": k,
                         "hint": "" if i % 2 else "Look at the whole picture.", "image": "image.png",
                         "task": "closed choice", "grade": "grade1", "subject": "natural science",
                         "topic": "colors", "category": "synthetic", "skill": "colors", "lecture": "",
                         "solution": "", "split": "test"}
        storage.write_bytes_atomic(storage.join(root, "ScienceQA", "images", "test", pid, "image.png"),
                                   png_bytes((32, 32), _COLORS[k][1]))
        test_ids.append(pid)
        answers[pid] = "ABCD"[k]
    # a text-only test question (SQA-IMG drops it) and a train question (not in the test split)
    problems["9998"] = {**problems[test_ids[0]], "image": None}
    problems["9999"] = {**problems[test_ids[0]], "split": "train"}
    storage.write_text_atomic(storage.join(root, "ScienceQA", "problems.json"), json.dumps(problems, indent=1))
    storage.write_text_atomic(storage.join(root, "ScienceQA", "pid_splits.json"),
                              json.dumps({"train": ["9999"], "val": [], "test": test_ids + ["9998"]}))
    return answers


def write_synthetic_benchmark(root: str, name: str, n: int) -> dict[str, str]:
    """Write ``n`` items (per split for POPE) of benchmark ``name`` under ``root``; return the
    correct answer text per item id."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if name == "pope":
        return _write_pope(str(root), n)
    if name == "sqa":
        return _write_sqa(str(root), n)
    raise ValueError(f"no synthetic writer for {name!r}; available: {', '.join(SYNTHETIC_BENCHMARKS)}")
