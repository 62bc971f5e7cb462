"""``phantom-ray ask`` on a tiny export: the streamed answer equals the engine's whole answer, the
chat keeps its history and takes images with ``/image``, and a user's mistake is one line."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from phantom_ray.cli import main

QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from PIL import Image, ImageDraw

    from phantom_ray.model import PhantomForCausalLM
    from phantom_ray.processing import load_tokenizer

    d = tmp_path_factory.mktemp("ask")
    export = d / "export"
    model = PhantomForCausalLM.from_preset("tiny-qwen2", seed=0)
    model.save_pretrained(str(export))
    load_tokenizer("tiny-qwen2", model.config).save_pretrained(str(export))
    images = []
    for i, colour in enumerate(["red", "blue"]):
        img = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(img).ellipse([6, 6, 26, 26], fill=colour)
        path = d / f"shape{i}.png"
        img.save(path)
        images.append(path)
    return export, images


def _engine(export):
    pytest.importorskip("phantom_ray.infer.torch_engine", reason="TorchEngine not landed yet")
    from phantom_ray.infer.api import load_engine

    return load_engine(str(export), backend="torch", device="cpu")


def _reference(export, messages, images, max_tokens):
    from phantom_ray.ask import open_source
    from phantom_ray.infer.api import Request, SamplingParams

    engine = _engine(export)
    try:
        [gen] = engine.generate([Request(messages=messages, images=[open_source(str(p)) for p in images],
                                         params=SamplingParams(max_tokens=max_tokens))])
    finally:
        engine.close()
    assert gen.error is None, gen.error_detail
    return gen.text


def test_ask_one_shot_streams_the_engines_answer(tiny_export, capsys):
    export, images = tiny_export
    _engine(export).close()
    rc = main(["ask", "--model", str(export), "--engine", "torch", "--device", "cpu", "--max-tokens", "12",
               "--image", str(images[0]), QUESTION])
    out, err = capsys.readouterr()
    assert rc == 0, err
    want = _reference(export, [{"role": "user", "content": "<image>\n" + QUESTION}], images[:1], 12)
    assert out == want + "\n"


def test_ask_chat_images_and_history(tiny_export, monkeypatch, capsys):
    export, images = tiny_export
    _engine(export).close()
    script = f"/image {images[0]}\n{QUESTION}\n/image {images[1]}\nAnd this one?\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    rc = main(["ask", "--model", str(export), "--engine", "torch", "--device", "cpu", "--max-tokens", "6"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "image 1 attached" in err and "image 2 attached" in err
    first, second = out.split("\n")[:2]
    turn1 = [{"role": "user", "content": "<image>\n" + QUESTION}]
    assert first == _reference(export, turn1, images[:1], 6)
    # the second turn carries the first question, its answer and both images
    turn2 = turn1 + [{"role": "assistant", "content": first}, {"role": "user", "content": "<image>\nAnd this one?"}]
    assert second == _reference(export, turn2, images, 6)


def test_ask_missing_model_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "phantom_ray.cli", "ask", "--model", str(tmp_path / "nope"),
                          "hello"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and "Traceback" not in res.stderr, res.stderr


def test_ask_missing_image_is_one_line(tmp_path, capsys):
    rc = main(["ask", "--model", "tiny-qwen2", "--image", str(tmp_path / "missing.png"), "hello"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing.png" in err[0], err
