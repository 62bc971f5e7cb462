"""Fast checks of the quickstart's pieces: metrics reading, the curves PNG, the gallery's escaping,
the quiet console (our lines kept, third-party records in the file only) and plain progress lines."""

from __future__ import annotations

import io
import json
import logging

from PIL import Image

from phantom_ray.quickstart import read_train_metrics, write_curves, write_gallery


def test_metrics_from_jsonl_and_from_worker_logs(tmp_path):
    run = tmp_path / "runs" / "step2"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.5}) + "\n"
                                       + json.dumps({"step": 1, "loss": 2.0}) + "\n{\"step\": 3, \"lo")
    assert [(r["step"], r["loss"]) for r in read_train_metrics(str(run))] == [(1, 2.0), (2, 1.5)]
    # no metrics.jsonl: rank 0's [phantom-train] lines in the Ray session's worker logs
    other = tmp_path / "runs" / "step1"
    other.mkdir()
    logs = tmp_path / "session" / "logs"
    logs.mkdir(parents=True)
    (logs / "worker-abc-01-123.out").write_text(
        "noise\n[phantom-train] {\"loss\": 3.0, \"step\": 10}\n"
        "[phantom-train] {\"step\": 10, \"done\": true, \"export\": \"/w/step1-export\", \"loss\": 3.0}\n"
        "[phantom-train] {\"step\": 11, \"done\": true, \"export\": \"/w/step2-export\", \"loss\": 9.0}\n")
    recs = read_train_metrics(str(other), str(tmp_path / "session"))
    assert [(r["step"], r["loss"]) for r in recs] == [(10, 3.0)]


def test_curves_png_has_both_steps(tmp_path):
    s1 = [{"step": i, "loss": 6 - 0.1 * i, "pref_accuracy": 0.5} for i in range(1, 11)]
    s2 = [{"step": i, "loss": 3 / i, "pref_accuracy": min(1.0, 0.4 + i / 500)} for i in range(10, 401, 10)]
    path = write_curves(str(tmp_path / "c.png"), s1, s2, 0.36, 0.6, 0.28)
    img = Image.open(path).convert("RGB")
    colours = {c for _, c in img.getcolors(1 << 20)}
    assert (0x1F, 0x77, 0xB4) in colours and (0xFF, 0x7F, 0x0E) in colours  # step 1 blue, step 2 orange


def test_gallery_escapes_text_and_embeds_images(tmp_path):
    img_path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(img_path)
    items = [{"image": str(img_path), "question": "Is <b>this</b> & that red?", "answer": "<script>x</script>",
              "chosen": "red", "correct": False}]
    page = (tmp_path / "g.html")
    write_gallery(str(page), items, {"a.png": "a \"red\" <square>"}, {str(img_path) + "\0" + items[0]["question"]: "blue"})
    html = page.read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;this&lt;/b&gt; &amp; that" in html
    assert "a &quot;red&quot; &lt;square&gt;" in html and "data:image/png;base64," in html
    assert "wrong" in html and "expected red" in html and "before training: blue" in html


def test_quiet_console_keeps_ours_and_files_the_rest(tmp_path, capsys):
    from phantom_ray.logs import progress, setup_logging

    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        logs = setup_logging(tmp_path, verbose=False, name="t")
        logging.getLogger("ray.data").info("execution plan ...")
        logging.getLogger("transformers.x").warning("third-party warning")
        logging.getLogger("phantom_ray.train").warning("our warning")
        logging.getLogger("phantom_ray.train").info("our info")
        err = capsys.readouterr().err
        assert "our warning" in err and "third-party" not in err and "execution plan" not in err
        for h in logs._handlers:
            h.flush()
        text = logs.file.read_text()
        assert all(s in text for s in ("execution plan", "third-party warning", "our warning", "our info"))
        out = io.StringIO()
        with progress(3, "stage", unit="step", interval=0.0, file=out) as bar:
            for _ in range(3):
                bar.update(1)
        lines = out.getvalue().splitlines()
        assert lines[-1].startswith("  stage: 3/3 step (100%)") and "\r" not in out.getvalue() and len(lines) == 3
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
