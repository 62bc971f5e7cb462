"""The quickstart as a new user runs it (small budget): every stage leaves its output, training beats
the start, the console stays short and quiet, and the pictures exist and are linked from the summary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quickstart_small_budget_is_quiet_and_draws_pictures(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PHANTOM_RAY_CACHE=str(tmp_path / "cache"))
    env.pop("PHANTOM_RAY_VERBOSE", None)
    work = tmp_path / "qs"
    res = subprocess.run([sys.executable, "-m", "phantom_ray.cli", "quickstart", "--workdir", str(work),
                          "--budget", "small"], env=env, capture_output=True, text=True, timeout=1500)
    console = res.stdout + res.stderr
    assert res.returncode == 0, console[-6000:]
    # one screen per stage: the whole run in at most 150 lines, none of them third-party chatter
    n_lines = console.count("\n")
    assert n_lines <= 150, f"{n_lines} lines:\n{console}"
    for noise in ("(RayTrainWorker", "(TrainController", "(raylet)", "[transformers]", "Traceback",
                  "logging_progress", "ServeController", "real_accelerator", "deepspeed.ops", "\x1b["):
        assert noise not in console, f"{noise!r} on the console:\n{console}"
    assert re.search(r"\[7/7\] serve the model", res.stdout) and "quickstart summary" in res.stdout

    s = json.loads((work / "summary.json").read_text())
    assert s["accuracy_after"]["accuracy"] > s["accuracy_before"]["accuracy"]
    assert s["accuracy_after"]["accuracy"] > s["accuracy_after"]["chance"]
    assert (Path(s["corpus"]["packed"]) / "manifest.json").exists()
    assert (Path(s["training"]["step1"]["export"]) / "config.json").exists()
    assert (Path(s["training"]["step2"]["export"]) / "config.json").exists()
    assert s["captions"]["images"] > 0 and s["captions"]["errors"] == 0
    assert isinstance(s["serve"]["answer"], str) and s["serve"]["model"] == "phantom-quickstart"

    # the pictures: a PNG of both training steps' curves and a gallery page, both named in the summary
    png, page = Path(s["curves"]["png"]), Path(s["gallery"]["html"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and s["curves"]["step1_points"] >= 2
    assert s["curves"]["step2_points"] >= 2
    assert f"training curves:    {png}" in res.stdout and f"gallery:            {page}" in res.stdout
    html = page.read_text()
    assert html.count('<div class="card') == s["gallery"]["images"] == s["captions"]["images"]
    assert html.count("data:image/png;base64,") == s["gallery"]["images"]
    assert html.count("right") >= s["gallery"]["right"]
    # everything kept: the log directory holds this process's log and Ray's session logs
    logs = Path(s["logs"])
    assert (logs / "phantom_ray.log").stat().st_size > 0
    assert any((logs / "ray").glob("worker-*.out")), sorted(p.name for p in logs.iterdir())
    assert f"logs: {logs}" in res.stdout
