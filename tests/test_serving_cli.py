"""``phantom-ray serve``: argument parsing and config errors (fast), and a real run of
``serve/local-cpu.yaml`` answered over HTTP (slow, ~40-90 s on 2 CPUs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import free_port

from phantom_ray.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def test_serve_verb_parses_config_host_and_port():
    args = build_parser(["serve", "--config", "serve/local-cpu.yaml"]).parse_args(
        ["serve", "--config", "serve/local-cpu.yaml", "--host", "0.0.0.0", "--port", "9001"])
    assert args.config == "serve/local-cpu.yaml" and args.host == "0.0.0.0" and args.port == 9001
    assert callable(args.func)


def test_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    config = yaml.safe_load((REPO / "serve" / "local-cpu.yaml").read_text())
    config["applications"][0]["args"]["models"][0]["max_batch_sizee"] = 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    assert main(["serve", "--config", str(bad)]) == 2
    assert "max_batch_sizee" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.slow
def test_phantom_ray_serve_runs_local_cpu_config_until_interrupted(tmp_path):
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "PHANTOM_API_KEYS": "",
           "RAY_ADDRESS": ""}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "phantom_ray.cli", "serve", "--config", "serve/local-cpu.yaml", "--port", str(port),
         "--num-cpus", "2"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not come up in 180 s"
            time.sleep(2)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert sorted(m["id"] for m in models["data"]) == ["tiny-internlm2", "tiny-qwen2"]
        for model in ("tiny-qwen2", "tiny-internlm2"):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
                "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 5
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        log.close()
    assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]
