"""OpenAI-compatible HTTP API without Ray (FastAPI TestClient, in-process tiny workers): every
malformed request class gets its status code and OpenAI's error body, and the API keeps answering;
API-key auth; the server-sent events format; config files and args validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from phantom_ray.serving.api import Frontend, create_api
from phantom_ray.serving.config import ServeArgs, parse_args
from phantom_ray.serving.worker import ModelWorker
from helpers import data_uri, png_bytes
from serving_helpers import WorkerBackend, tiny_args

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def args():
    return tiny_args(allowed_image_url_prefixes=["https://images.example.com/"])


@pytest.fixture(scope="module")
def workers(args):
    return {m.name: ModelWorker(m, max_image_pixels=args.max_image_pixels) for m in args.models}


def make_client(args, workers, api_keys=None):
    frontend = Frontend(args, {n: WorkerBackend(w) for n, w in workers.items()}, api_keys=api_keys)
    return TestClient(create_api(frontend))


@pytest.fixture(scope="module")
def client(args, workers):
    with make_client(args, workers) as c:
        yield c


def chat(content, model="tiny-qwen2", **kw):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, **kw}


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def assert_openai_error(resp, status, code=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert {"type", "param", "code"} <= set(err)
    if code is not None:
        assert err["code"] == code, err


BIG_PNG = png_bytes((600, 600))  # 360000 px > 512*512 = 262144, few bytes (solid colour)

MALFORMED = {
    # name: (body or raw string, status, code)
    "not_json": ("{not json", 400, "invalid_json"),
    "json_array": ("[1, 2]", 400, "invalid_json"),
    "missing_messages": ({"model": "tiny-qwen2"}, 400, "invalid_request"),
    "empty_messages": ({"model": "tiny-qwen2", "messages": []}, 400, "invalid_request"),
    "bad_role": ({"model": "tiny-qwen2", "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_request"),
    "n_17": (chat("hi", n=17), 400, "invalid_request"),
    "temperature_out_of_range": (chat("hi", temperature=5), 400, "invalid_request"),
    "bad_base64": (chat([image_part("data:image/png;base64,@@@not-base64@@@"), {"type": "text", "text": "x"}]),
                   400, "invalid_base64"),
    "undecodable_image": (chat([image_part(data_uri(b"this is not an image at all"))]), 400, "invalid_image"),
    "truncated_image": (chat([image_part(data_uri(png_bytes()[:70]))]), 400, None),
    "unknown_content_type": (chat([{"type": "input_audio", "input_audio": {"data": "AAAA"}}]), 400,
                             "unsupported_content_type"),
    "too_many_images": (chat([image_part(data_uri(png_bytes()))] * 3), 400, "too_many_images"),
    "prompt_too_many_tokens": (chat("many words " * 300), 400, "prompt_exceeds_max_length"),
    "max_tokens_over_limit": (chat("hi", max_tokens=100000), 400, "max_tokens_too_large"),
    "url_not_allowed": (chat([image_part("https://evil.example.org/a.png")]), 400, "image_url_not_allowed"),
    "s3_not_allowed": (chat([image_part("s3://bucket/a.png")]), 400, "image_url_not_allowed"),
    "unknown_model": (chat("hi", model="phantom-70b"), 404, "model_not_found"),
    "image_over_byte_limit": (chat([image_part(data_uri(b"\x89PNG" + b"0" * (70 * 1024)))]), 413, "image_too_large"),
    "image_over_pixel_limit": (chat([image_part(data_uri(BIG_PNG))]), 413, "image_too_large"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request_gets_status_and_openai_error(client, name):
    body, status, code = MALFORMED[name]
    if isinstance(body, str):
        resp = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        resp = client.post("/v1/chat/completions", json=body)
    assert_openai_error(resp, status, code)
    # the server keeps serving afterwards
    ok = client.post("/v1/chat/completions", json=chat("still there?"))
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_completion_with_image_and_models_listing(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-qwen2", "tiny-internlm2"]
    assert client.get("/v1/models/tiny-internlm2").json()["id"] == "tiny-internlm2"
    assert_openai_error(client.get("/v1/models/nope"), 404, "model_not_found")
    assert client.get("/health").json()["status"] == "ok"
    for model in ("tiny-qwen2", "tiny-internlm2"):
        body = chat([image_part(data_uri(png_bytes())), {"type": "text", "text": "what colour?"}], model=model,
                    max_tokens=7, ignore_eos=True)
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["object"] == "chat.completion" and out["model"] == model
        assert out["choices"][0]["message"]["role"] == "assistant"
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 7
        assert out["usage"]["prompt_tokens"] > 4 * 1  # image tokens are part of the prompt


def test_streaming_events_concatenate_to_the_non_streaming_answer(client):
    body = chat([image_part(data_uri(png_bytes())), {"type": "text", "text": "describe"}], max_tokens=10,
                ignore_eos=True)
    full = client.post("/v1/chat/completions", json=body).json()
    with client.stream("POST", "/v1/chat/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert len(chunks) >= 4  # token by token, not one blob


def test_api_keys_are_required_when_configured(args, workers):
    with make_client(args, workers, api_keys=["k-one", "k-two"]) as c:
        assert c.get("/health").status_code == 200  # probes need no key
        assert_openai_error(c.get("/v1/models"), 401, "missing_api_key")
        assert_openai_error(c.post("/v1/chat/completions", json=chat("hi"),
                                   headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
        resp = c.post("/v1/chat/completions", json=chat("hi"), headers={"Authorization": "Bearer k-two"})
        assert resp.status_code == 200
        assert "k-two" not in resp.text and "k-one" not in resp.text


# ---- configs ---------------------------------------------------------------------------------------
SERVE_FILES = sorted((REPO / "serve").glob("*.yaml"))


@pytest.mark.parametrize("path", SERVE_FILES, ids=lambda p: p.name)
def test_serve_config_validates_against_ray_schema_and_our_args(path):
    from ray.serve.schema import ServeDeploySchema

    from phantom_ray.serving.cli import load_serve_config

    raw = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(raw)
    schema = load_serve_config(str(path))
    ours = [a for a in schema.applications if a.import_path == "phantom_ray.serving.app:build_app"]
    assert ours, f"{path.name}: no phantom_ray application"
    for app in ours:
        parsed = parse_args(app.args)
        for m in parsed.models:
            opts = m.deployment_options()
            assert opts["max_ongoing_requests"] >= m.max_batch_size


def test_local_cpu_config_hosts_the_two_tiny_presets_on_cpu():
    (app,) = yaml.safe_load((REPO / "serve" / "local-cpu.yaml").read_text())["applications"]
    parsed = parse_args(app["args"])
    assert [m.name for m in parsed.models] == ["tiny-qwen2", "tiny-internlm2"]
    assert all(m.num_gpus == 0 and m.is_preset for m in parsed.models)
    # two models and the ingress fit on two CPUs
    assert sum(m.num_cpus for m in parsed.models) + parsed.ingress_num_cpus <= 2


@pytest.mark.parametrize("bad,match", [
    ({"models": []}, "at least 1"),
    ({"models": [{"name": "a", "checkpoint": "tiny-qwen2", "num_gpu": 1}]}, "num_gpu"),
    ({"models": [{"name": "a", "checkpoint": "x"}, {"name": "a", "checkpoint": "y"}]}, "unique"),
    ({"models": [{"name": "a b", "checkpoint": "x"}]}, "model name"),
    ({"models": [{"name": "a", "checkpoint": "x", "max_batch_size": 64, "max_ongoing_requests": 8}]}, "max_batch_size"),
    ({"models": [{"name": "a", "checkpoint": "x", "num_replicas": 2,
                  "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}]}, "not both"),
    ({"models": [{"name": "a", "checkpoint": "x", "autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}]},
     "replicas"),
    ({"models": [{"name": "a", "checkpoint": "x"}], "allowed_image_url_prefixes": ["https://"]}, "every host"),
    ({"models": [{"name": "a", "checkpoint": "x", "dtype": "float64"}]}, "dtype"),
])
def test_invalid_args_are_refused_naming_the_field(bad, match):
    with pytest.raises(ValidationError, match=match):
        ServeArgs.model_validate(bad)


class _FailingBackend:
    """Fails before any event (``at=0``) or after ``at`` deltas, like a replica that died."""

    def __init__(self, at: int):
        self.at = at

    async def stream(self, payload):
        for k in range(self.at):
            yield {"type": "delta", "text": f"t{k}"}
        raise RuntimeError("replica died")


def test_backend_failures_are_openai_errors_and_requests_are_counted(args):
    seen = []
    small = args.model_copy(update={"max_request_bytes": 2000})
    backends = {"tiny-qwen2": _FailingBackend(0), "tiny-internlm2": _FailingBackend(2)}
    frontend = Frontend(small, backends, on_response=lambda path, status: seen.append((path, status)))
    with TestClient(create_api(frontend), raise_server_exceptions=False) as c:
        resp = c.post("/v1/chat/completions", json=chat("hi"))
        assert_openai_error(resp, 500, "internal_error")
        assert "replica died" not in resp.text  # details stay in the log
        with c.stream("POST", "/v1/chat/completions", json=chat("hi", model="tiny-internlm2", stream=True)) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "internal_error"
        assert "".join(json.loads(x[6:])["choices"][0]["delta"].get("content", "") for x in lines[:-2]) == "t0t1"
        assert_openai_error(c.post("/v1/chat/completions", json=chat("x" * 3000)), 413, "request_too_large")
    assert ("/v1/chat/completions", 500) in seen and ("/v1/chat/completions", 413) in seen


def test_s3_image_urls_work_only_under_an_allowed_prefix(workers, s3_bucket):
    from phantom_ray.storage import write_bytes_atomic

    write_bytes_atomic(f"{s3_bucket}/images/red.png", png_bytes())
    write_bytes_atomic(f"{s3_bucket}/private/red.png", png_bytes())
    args = tiny_args(allowed_image_url_prefixes=[f"{s3_bucket}/images/"])
    with make_client(args, workers) as c:
        ok = c.post("/v1/chat/completions", json=chat([image_part(f"{s3_bucket}/images/red.png")], max_tokens=3))
        assert ok.status_code == 200, ok.text
        inline = c.post("/v1/chat/completions", json=chat([image_part(data_uri(png_bytes()))], max_tokens=3))
        assert ok.json()["choices"][0]["message"] == inline.json()["choices"][0]["message"]
        assert ok.json()["usage"]["prompt_tokens"] == inline.json()["usage"]["prompt_tokens"]
        assert_openai_error(c.post("/v1/chat/completions", json=chat([image_part(f"{s3_bucket}/private/red.png")])),
                            400, "image_url_not_allowed")
        assert_openai_error(c.post("/v1/chat/completions", json=chat([image_part(f"{s3_bucket}/images/none.png")])),
                            400, "image_fetch_failed")
