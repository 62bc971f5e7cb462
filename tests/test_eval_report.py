"""``phantom-ray eval``'s report files: the markdown table and the bar chart against the paper."""

from __future__ import annotations

from PIL import Image

from phantom_ray.eval.results import build_results, write_results_files
from phantom_ray.eval.scorers import BenchmarkScore


def _results():
    scores = [BenchmarkScore("sqa", 61.5, "accuracy", 40), BenchmarkScore("pope", 70.25, "f1", 90),
              BenchmarkScore("mmvet", None, "gpt-score", 0, skipped="no judge configured")]
    return build_results(scores, model="BK-Lee/Phantom-0.5B")


def test_markdown_and_chart_are_written(tmp_path):
    files = write_results_files(_results(), str(tmp_path / "out"))
    md = (tmp_path / "out" / "results.md").read_text()
    assert files["markdown"].endswith("results.md") and files["chart"].endswith("results.png")
    # our score and the paper's 0.5B column side by side; a skipped row says why
    assert "| sqa | accuracy | 40 | 61.5 | 83.2 |" in md
    assert "| pope | f1 | 90 | 70.2 | - |" in md or "| pope | f1 | 90 | 70.3 | - |" in md
    assert "no judge configured" in md and "paper (0.5b)" in md
    img = Image.open(tmp_path / "out" / "results.png")
    assert img.format == "PNG" and img.width >= 560 and img.height >= 300
    # bars were drawn: the two series' colours are present
    colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert (0x1F, 0x77, 0xB4) in colours and (0xBB, 0xBB, 0xBB) in colours


def test_report_files_go_to_s3(s3_bucket):
    from phantom_ray import storage

    out = f"{s3_bucket}/eval/run1"
    write_results_files(_results(), out)
    assert storage.read_bytes(f"{out}/results.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| sqa |" in storage.read_text(f"{out}/results.md")
