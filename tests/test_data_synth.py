"""Synthetic shapes corpus: ground truth matches the pixels, deterministic, every layout packable."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from phantom_ray.cli import main as cli_main
from phantom_ray.data.synth import BACKGROUNDS, COLOURS, COUNT_WORDS, LAYOUT_FILES, QUESTIONS, synthesize


def test_answers_match_the_pixels(tmp_path):
    synthesize(str(tmp_path), num_samples=60, layout="llava", seed=0, heldout_fraction=0.0)
    records = json.loads((tmp_path / LAYOUT_FILES["llava"]).read_text())
    seen_qtypes = set()
    for r in records:
        meta = r["meta"]
        seen_qtypes.add(meta["qtype"])
        px = np.asarray(Image.open(tmp_path / r["image"]).convert("RGB")).reshape(-1, 3)
        colours = {tuple(c) for c in np.unique(px, axis=0)}
        assert colours == {COLOURS[meta["colour"]], BACKGROUNDS[meta["background"]]}
        share = (px == COLOURS[meta["colour"]]).all(1).mean()
        assert 0.01 < share < 0.8
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        expected = {"colour": meta["colour"], "shape": meta["shape"], "count": COUNT_WORDS[meta["count"] - 1]}
        if meta["qtype"] == "caption":
            assert meta["colour"] in a and meta["shape"] in a and a.endswith(f"{meta['background']} background.")
        else:
            assert a == expected[meta["qtype"]] and q.endswith(QUESTIONS[meta["qtype"]])
    assert seen_qtypes == set(QUESTIONS)


def test_deterministic_and_heldout_differs(tmp_path):
    a = synthesize(str(tmp_path / "a"), num_samples=20, layout="triples", seed=5)
    b = synthesize(str(tmp_path / "b"), num_samples=20, layout="triples", seed=5)
    c = synthesize(str(tmp_path / "c"), num_samples=20, layout="triples", seed=6)
    ra, rb, rc = (json.load(open(x["triples"]["train"])) for x in (a, b, c))
    assert ra == rb and ra != rc
    held = json.load(open(a["triples"]["heldout"]))
    assert len(held) == 2 and os.path.exists(os.path.join(os.path.dirname(a["triples"]["heldout"]), held[0]["image"]))
    assert all(r["chosen"] != r["rejected"] for r in ra + held)


def test_cli_synth_then_pack_all_layouts(tmp_path, capsys):
    assert cli_main(["data", "synth", "--output", str(tmp_path / "s"), "--num-samples", "12", "--seed", "1"]) == 0
    for layout, fname in LAYOUT_FILES.items():
        out = str(tmp_path / "p" / layout)
        assert cli_main(["data", "pack", "--input", str(tmp_path / "s" / layout / fname), "--layout", layout,
                         "--output", out, "--executor", "local"]) == 0
        manifest = json.load(open(os.path.join(out, "manifest.json")))
        assert manifest["rows"] == 12 and manifest["errors"] == 0
        assert os.path.exists(os.path.join(out, "errors.parquet"))
    capsys.readouterr()
    assert cli_main(["data", "info", "--output", str(tmp_path / "p" / "parquet")]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 12
