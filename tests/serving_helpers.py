"""Helpers for the serving tests: tiny-preset args, request bodies, and an in-process
backend that runs the HTTP API on ``ModelWorker``s without Ray."""

from __future__ import annotations

from helpers import data_uri, png_bytes

from phantom_ray.serving.config import ServeArgs
from phantom_ray.serving.worker import ModelWorker


def tiny_args(**overrides) -> ServeArgs:
    """Two tiny presets on CPU with small limits, as the serving tests use them."""
    common = dict(engine="torch", dtype="float32", attn_implementation="sdpa", num_cpus=0.5, torch_num_threads=1,
                  max_ongoing_requests=32, max_batch_size=16, batch_wait_timeout_s=0.02,
                  max_prompt_tokens=256, max_tokens_limit=128, default_max_tokens=16)
    models = [
        {"name": "tiny-qwen2", "checkpoint": "tiny-qwen2", **common},
        {"name": "tiny-internlm2", "checkpoint": "tiny-internlm2", **common},
    ]
    model_overrides = overrides.pop("model_overrides", {})
    for m in models:
        m.update(model_overrides.get(m["name"], {}))
        if m["engine"] == "vllm":  # continuous batching: the torch engine's batching fields do not apply
            for k in ("max_batch_size", "batch_wait_timeout_s"):
                if k not in model_overrides.get(m["name"], {}):
                    m.pop(k)
    args = {"models": models, "api_keys_env": None, "allowed_image_url_prefixes": [], "max_images_per_request": 2,
            "max_image_bytes": 64 * 1024, "max_image_pixels": 512 * 512, "ingress_num_cpus": 0.1}
    args.update(overrides)
    return ServeArgs.model_validate(args)


def request_variants(n: int = 16, model: str = "tiny-qwen2") -> list[dict]:
    """n different greedy chat requests: text-only and with images, different lengths, stop strings."""
    out = []
    for i in range(n):
        content: list[dict] = [{"type": "text", "text": f"question {i}: " + "what is shown? " * (i % 4 + 1)}]
        if i % 2:
            content.insert(0, {"type": "image_url",
                               "image_url": {"url": data_uri(png_bytes((24 + 8 * i, 32), (10 * i, 90, 200)))}})
        body = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": 6 + i, "ignore_eos": i % 3 != 0}
        if i % 5 == 4:
            body["messages"] = [{"role": "system", "content": "be brief"}] + body["messages"]
        out.append(body)
    return out


class WorkerBackend:
    """An in-process backend for ``phantom_ray.serving.api.Frontend`` (no Ray): the same API and
    batching as under Serve, for tests and debugging."""

    def __init__(self, worker: ModelWorker):
        self.worker = worker

    def stream(self, payload: dict):
        return self.worker.generate(payload)


def build_local_api(args: ServeArgs, api_keys: list[str] | None = None):
    """The FastAPI app over in-process workers (one per model): ``uvicorn`` can serve it without Ray."""
    from phantom_ray.serving.api import Frontend, create_api

    workers = {m.name: ModelWorker(m, max_image_pixels=args.max_image_pixels) for m in args.models}
    return create_api(Frontend(args, {n: WorkerBackend(w) for n, w in workers.items()}, api_keys=api_keys))
