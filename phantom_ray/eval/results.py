"""Results table (markdown + JSON) with the paper's reported score beside each benchmark.

Paper scores (docs/phantom.md#evaluation) were read off the paper's Figure 1 radar chart; MM-Vet off Figure 2,
about +-1). The paper's "MMB" is put beside ``mmbench_dev``; which MMBench split the figure shows is
not confirmed. The original harness ran 8-bit weights with 3-beam search, so expect gaps when either
differs.
"""

from __future__ import annotations

import re
from typing import Any

PAPER_SIZES = ("0.5b", "1.8b", "3.8b", "7b")
PAPER_SCORES: dict[str, dict[str, float]] = {
    "sqa": {"0.5b": 83.2, "1.8b": 91.9, "3.8b": 94.2, "7b": 95.6},
    "visualwebbench": {"0.5b": 51.8, "1.8b": 55.9, "3.8b": 59.8, "7b": 67.7},
    "mathvista": {"0.5b": 51.7, "1.8b": 60.9, "3.8b": 60.6, "7b": 70.9},
    "mmbench_dev": {"0.5b": 72.7, "1.8b": 76.6, "3.8b": 80.4, "7b": 84.8},
    "seed-2-plus": {"0.5b": 47.9, "1.8b": 57.1, "3.8b": 61.8, "7b": 67.2},
    "chartqa": {"0.5b": 78.0, "1.8b": 87.0, "3.8b": 87.3, "7b": 87.8},
    "blink": {"0.5b": 39.3, "1.8b": 44.2, "3.8b": 51.5, "7b": 58.9},
    "mmstar": {"0.5b": 33.3, "1.8b": 45.5, "3.8b": 46.5, "7b": 57.7},
    "mmvet": {"0.5b": 46.0, "1.8b": 54.0, "3.8b": 54.5, "7b": 71.0},
}
APPROXIMATE = {"mmvet"}


def paper_size(model: str | None) -> str | None:
    """'BK-Lee/Phantom-1.8B' or 'phantom-1.8b' -> '1.8b'; None when no paper size is named."""
    if not model:
        return None
    m = re.search(r"(?<![\d.])(0\.5|1\.8|3\.8|7)\s*b(?![a-z])", str(model).lower())
    return f"{m.group(1)}b" if m else None


def paper_score(benchmark: str, size: str | None) -> float | None:
    return PAPER_SCORES.get(benchmark, {}).get(size) if size else None


def build_results(scores: list, model: str | None, size: str | None = None, extra: dict | None = None) -> dict[str, Any]:
    """JSON-ready results: one row per benchmark with our score and the paper's."""
    size = size or paper_size(model)
    rows = []
    for s in scores:
        rows.append({**s.to_dict(), "paper": paper_score(s.benchmark, size),
                     "paper_approximate": s.benchmark in APPROXIMATE})
    return {"model": model, "paper_size": size, "results": rows, **(extra or {})}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def results_markdown(results: dict[str, Any]) -> str:
    size = results.get("paper_size")
    head = f"paper ({size})" if size else "paper"
    lines = [f"# Eval results: {results.get('model') or '(unnamed model)'}", "",
             f"| benchmark | metric | n | score | {head} | note |", "|---|---|---|---|---|---|"]
    for r in results["results"]:
        paper = _fmt(r["paper"]) + (" (approx.)" if r["paper"] is not None and r["paper_approximate"] else "")
        lines.append(f"| {r['benchmark']} | {r['metric']} | {r['n']} | {_fmt(r['score'])} | {paper} | "
                     f"{r['skipped'] or ''} |")
    return "\n".join(lines) + "\n"


def results_chart_png(results: dict[str, Any]) -> bytes:
    """A bar chart (PNG bytes) of our score per benchmark beside the paper's, for ``results.png``."""
    import os
    import tempfile

    from phantom_ray.plots import Series, bar_chart

    rows = results["results"]
    size = results.get("paper_size")
    names = [r["benchmark"] + ("*" if r.get("paper_approximate") and r.get("paper") is not None else "") for r in rows]
    ours = Series("ours" + (f" ({results['model']})" if results.get("model") else ""), color="#1f77b4",
                  values=[None if r.get("skipped") else r.get("score") for r in rows])
    paper = Series(f"paper ({size})" if size else "paper (no size named)", color="#bbbbbb",
                   values=[r.get("paper") for r in rows])
    title = "Eval results" + ("  (* paper value read off a figure, about +-1)" if any(n.endswith("*") for n in names) else "")
    with tempfile.TemporaryDirectory(prefix="phantom-chart-") as d:
        path = os.path.join(d, "results.png")
        bar_chart(path, names, [ours, paper], title=title, ylabel="score (0-100)", ymax=100.0)
        with open(path, "rb") as f:
            return f.read()


def write_results_files(results: dict[str, Any], output: str) -> dict[str, str]:
    """``results.md`` (the table) and ``results.png`` (the chart) under ``output`` (local or s3://)."""
    from phantom_ray import storage

    md = storage.join(output, "results.md")
    png = storage.join(output, "results.png")
    storage.write_text_atomic(md, results_markdown(results))
    storage.write_bytes_atomic(png, results_chart_png(results))
    return {"markdown": md, "chart": png}
