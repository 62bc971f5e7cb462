"""Helpers every kind of test uses, defined once: free ports, test images, a tiny processor, the
engine tests' independent reference, and Ray job submission (with conftest's ``ray_head``). (Topic fixtures live next to their tests: ``serving_helpers``,
``train_helpers``, ``eval_synthetic``, ``image_corpus``; ``net_trap`` is conftest's network trap.)
No test module imports another test module: shared code goes here or into those."""

from __future__ import annotations

import base64
import io
import socket
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(size=(40, 30), color=(200, 30, 30), fmt: str = "PNG") -> bytes:
    """An image of one colour, encoded (``fmt``: any PIL format name)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", tuple(size), tuple(color)).save(buf, format=fmt)
    return buf.getvalue()


def noise_png(seed: int, w: int, h: int, fmt: str = "PNG") -> bytes:
    """Uniform noise pixels from ``numpy.random.default_rng(seed)``, encoded: the same bytes per seed."""
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def noise_pil(w: int, h: int, seed: int = 0):
    """Uniform noise pixels from ``numpy.random.RandomState(seed)`` as a PIL image (the vLLM tests' images)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def tiny_processor(config: Any = "tiny-qwen2", **kw):
    """A ``PhantomProcessor`` over a tiny preset (or a ``PhantomConfig``) and the tiny tokenizer of its template."""
    from phantom_ray.model import PhantomConfig
    from phantom_ray.processing import PhantomProcessor, build_tiny_tokenizer

    cfg = PhantomConfig.from_preset(config) if isinstance(config, str) else config
    return PhantomProcessor(cfg, build_tiny_tokenizer(cfg.template), **kw)


def assert_implements_engine(engine) -> None:
    """``engine`` has every member of :class:`phantom_ray.infer.api.Engine` with the protocol's
    parameters (``isinstance`` against a runtime-checkable Protocol only checks that names exist)."""
    import inspect

    from phantom_ray.infer.api import Engine

    assert isinstance(engine.backend, str) and isinstance(engine.model_id, str)
    for name in ("generate", "stream", "close"):
        want = list(inspect.signature(getattr(Engine, name)).parameters)[1:]
        got = list(inspect.signature(getattr(engine, name)).parameters)
        assert got[:len(want)] == want, f"{type(engine).__name__}.{name}{got} does not take {want}"
    assert inspect.isasyncgenfunction(engine.stream), "stream must be an async generator of Events"


def greedy_reference(engine, image: Any, prompt: str, max_new_tokens: int) -> str:
    """Caption of one image by a direct ``model.generate`` call on a batch of one, prompt built by
    ``encode_prompt`` and decoded (stripped) by ``decode_generation``: no engine code involved."""
    import torch

    proc, model = engine.processor, engine.model
    with torch.inference_mode():
        s = proc.encode_prompt(prompt, images=image)
        pv = s.pixel_values.to(device=model.device, dtype=model.dtype) if s.pixel_values is not None else None
        ids = s.input_ids[None].to(model.device)
        gen = model.generate(ids, torch.ones_like(ids), pv, max_new_tokens=max_new_tokens,
                             stop_token_ids=proc.stop_token_ids, pad_token_id=proc.pad_token_id)
    n = int(gen.lengths[0])
    return proc.decode_generation(gen.sequences[0, :n].tolist())


def submit_job(client, **kwargs) -> str:
    """``client.submit_job(**kwargs)``, retried while the head's job agent is still starting."""
    import time

    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as exc:  # the head's job agent starts a little after the dashboard
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def wait_job(client, job_id: str, timeout: float) -> str:
    """The job's final status (stopped and ``"TIMEOUT"`` after ``timeout`` s)."""
    import time

    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(2)
    client.stop_job(job_id)
    return "TIMEOUT"
