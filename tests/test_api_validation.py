"""The HTTP API refuses what it would otherwise ignore or pay for: a malformed-request table
(parameters we do not honour, empty content, content types, size bounds), the bad-image corpus as
data: URIs and as URLs from a loopback image server (allowlist, traversal, redirects), each with
OpenAI's error shape; the server keeps answering afterwards."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from fastapi.testclient import TestClient
from image_corpus import bad_images, good_images

from phantom_ray.ingest import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from phantom_ray.serving.api import Frontend, create_api, largest_request_bytes
from phantom_ray.serving.protocol import max_prompt_chars
from helpers import data_uri, png_bytes
from serving_helpers import WorkerBackend, tiny_args
from phantom_ray.serving.worker import ModelWorker

torch.set_num_threads(1)
PNG = png_bytes()


class _Images(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    redirects: dict[str, str] = {}
    seen: list[str] = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        _Images.seen.append(self.path)
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.end_headers()
            return
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture(scope="module")
def image_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    port = srv.server_port
    _Images.files = {"/ok/red.png": PNG, "/private/red.png": PNG}
    _Images.files.update({f"/ok/bad/{k}.jpg": d for k, (d, _) in bad_images().items()})
    _Images.redirects = {"/ok/to-private": "/private/red.png", "/ok/to-other": "http://localhost:1/ok/red.png",
                         "/ok/to-ok": "/ok/red.png"}
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield port
    srv.shutdown()


@pytest.fixture(scope="module")
def client(image_server):
    # the ingest defaults (the limits pack, caption and eval use), a loopback image server allowed
    args = tiny_args(max_image_bytes=DEFAULT_MAX_BYTES, max_image_pixels=DEFAULT_MAX_PIXELS,
                     max_images_per_request=2, allow_private_image_hosts=True,
                     allowed_image_url_prefixes=[f"http://127.0.0.1:{image_server}/ok/"])
    workers = {m.name: ModelWorker(m, max_image_pixels=args.max_image_pixels) for m in args.models}
    frontend = Frontend(args, {n: WorkerBackend(w) for n, w in workers.items()})
    with TestClient(create_api(frontend)) as c:
        c.frontend = frontend
        yield c


def chat(content, **kw):
    return {"model": "tiny-qwen2", "messages": [{"role": "user", "content": content}], "max_tokens": 2,
            "temperature": 0, **kw}


def image(url):
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]


def assert_error(resp, status, code):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]


MALFORMED = {
    # vLLM's features on the torch engine: a 400 naming the engine (tests/test_openai_surface.py)
    "response_format_json": (chat("hi", response_format={"type": "json_object"}), 400, "unsupported_parameter"),
    "logprobs_true": (chat("hi", logprobs=True), 400, "unsupported_parameter"),
    # malformed values of honoured parameters
    "response_format_schema_missing": (chat("hi", response_format={"type": "json_schema"}), 400, "invalid_request"),
    "response_format_schema_no_schema": (chat("hi", response_format={"type": "json_schema", "json_schema": {}}),
                                         400, "invalid_request"),
    "top_logprobs_without_logprobs": (chat("hi", top_logprobs=3), 400, "invalid_request"),
    "top_logprobs_over_20": (chat("hi", logprobs=True, top_logprobs=21), 400, "invalid_request"),
    "n_0": (chat("hi", n=0), 400, "invalid_request"),
    "n_over_limit": (chat("hi", n=17), 400, "invalid_request"),
    # unhonoured parameters
    "tools": (chat("hi", tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter"),
    "tool_choice_auto": (chat("hi", tool_choice="auto"), 400, "unsupported_parameter"),
    "frequency_penalty": (chat("hi", frequency_penalty=0.5), 400, "unsupported_parameter"),
    "presence_penalty": (chat("hi", presence_penalty=-1), 400, "unsupported_parameter"),
    "logit_bias": (chat("hi", logit_bias={"50256": -100}), 400, "unsupported_parameter"),
    "unknown_field": (chat("hi", best_of=4), 400, "unsupported_parameter"),
    "completions_only_field": (chat("hi", echo=True), 400, "unsupported_parameter"),
    "audio_modality": (chat("hi", modalities=["text", "audio"]), 400, "unsupported_parameter"),
    "message_tool_calls": ({"model": "tiny-qwen2", "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]},
        {"role": "user", "content": "again"}]}, 400, "unsupported_parameter"),
    "part_extra_field": (chat([{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]), 400,
                         "unsupported_parameter"),
    "stream_options_extra": (chat("hi", stream=True, stream_options={"include_usage": True, "x": 1}), 400,
                             "invalid_request"),
    # empty content, every spelling
    "empty_string": (chat(""), 400, "empty_content"),
    "empty_list": (chat([]), 400, "empty_content"),
    "empty_system": ({"model": "tiny-qwen2", "messages": [{"role": "system", "content": ""},
                                                          {"role": "user", "content": "hi"}]}, 400, "empty_content"),
    "empty_assistant": ({"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": []},
                                                             {"role": "user", "content": "hi"}]}, 400, "empty_content"),
    "null_user_content": (chat(None), 400, "invalid_messages"),
    # sizes
    "text_over_char_bound": (chat("x" * (max_prompt_chars(256) + 1)), 400, "prompt_exceeds_max_length"),
    "too_many_images": (chat(image(data_uri(PNG)) + image(data_uri(PNG)) + image(data_uri(PNG))), 400,
                        "too_many_images"),
    # image URLs: allowlist, traversal, schemes, local files
    "url_other_prefix": (chat(image("http://127.0.0.1:{port}/private/red.png")), 400, "image_url_not_allowed"),
    "url_dot_segments": (chat(image("http://127.0.0.1:{port}/ok/../private/red.png")), 400, "image_url_not_allowed"),
    "url_encoded_dots": (chat(image("http://127.0.0.1:{port}/ok/%2e%2e/private/red.png")), 400,
                         "image_url_not_allowed"),
    "url_encoded_slash": (chat(image("http://127.0.0.1:{port}/ok%2f..%2fprivate/red.png")), 400,
                          "image_url_not_allowed"),
    "url_userinfo": (chat(image("http://127.0.0.1:{port}@localhost:{port}/ok/red.png")), 400,
                     "image_url_not_allowed"),
    "url_other_port": (chat(image("http://127.0.0.1:1/ok/red.png")), 400, "image_url_not_allowed"),
    "url_redirect_outside_prefix": (chat(image("http://127.0.0.1:{port}/ok/to-private")), 400,
                                    "image_url_not_allowed"),
    "url_redirect_other_host": (chat(image("http://127.0.0.1:{port}/ok/to-other")), 400, "image_url_not_allowed"),
    "url_metadata": (chat(image("http://169.254.169.254/latest/meta-data/")), 400, "image_url_not_allowed"),
    "url_missing": (chat(image("http://127.0.0.1:{port}/ok/none.png")), 400, "image_fetch_failed"),
    "local_file": (chat(image("/etc/hostname")), 400, "image_url_not_allowed"),
    "file_url": (chat(image("file:///etc/hostname")), 400, "image_url_not_allowed"),
    "s3_not_listed": (chat(image("s3://bucket/a.png")), 400, "image_url_not_allowed"),
    "bad_base64": (chat(image("data:image/png;base64,@@@")), 400, "invalid_base64"),
    "data_uri_text_type": (chat(image("data:text/plain;base64,aGVsbG8=")), 400, "invalid_image_url"),
}

NOOPS = {  # accepted: these values ask for nothing we do not do
    "n_1": chat("hi", n=1), "n_2": chat("hi", n=2), "logprobs_false": chat("hi", logprobs=False),
    "response_format_text": chat("hi", response_format={"type": "text"}), "tools_empty": chat("hi", tools=[]),
    "nulls": chat("hi", top_logprobs=None, tool_choice=None, response_format=None, presence_penalty=0),
    "detail_hint": chat([{"type": "image_url", "image_url": {"url": data_uri(PNG), "detail": "low"}},
                         {"type": "text", "text": "x"}]),
}


def _fill(body, port):
    import json

    return json.loads(json.dumps(body).replace("{port}", str(port)))


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request_table(client, image_server, name):
    body, status, code = MALFORMED[name]
    assert_error(client.post("/v1/chat/completions", json=_fill(body, image_server)), status, code)


def test_private_path_never_fetched(client, image_server):
    for name in [k for k in MALFORMED if k.startswith("url_")]:
        client.post("/v1/chat/completions", json=_fill(MALFORMED[name][0], image_server))
    assert "/private/red.png" not in _Images.seen


@pytest.mark.parametrize("name", sorted(NOOPS))
def test_noop_values_are_accepted(client, name):
    resp = client.post("/v1/chat/completions", json=NOOPS[name])
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("content_type,status", [
    ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("", 415), ("multipart/form-data", 415),
    ("application/json; charset=utf-8", 200), ("Application/JSON", 200),
])
def test_content_type(client, content_type, status):
    import json

    headers = {"Content-Type": content_type} if content_type else {}
    resp = client.post("/v1/chat/completions", content=json.dumps(chat("hi")).encode(), headers=headers)
    if status == 200:
        assert resp.status_code == 200, resp.text
    else:
        assert_error(resp, status, "unsupported_media_type")


def test_allowed_url_and_redirect_inside_prefix_are_served(client, image_server):
    for path in ["/ok/red.png", "/ok/to-ok", "/ok/./red.png", "/ok/x/../red.png"]:
        resp = client.post("/v1/chat/completions", json=chat(image(f"http://127.0.0.1:{image_server}{path}")))
        assert resp.status_code == 200, (path, resp.text)


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_image_corpus_over_http(client, image_server, name):
    data, reason = bad_images()[name]
    big = reason in ("too_many_pixels", "image_too_large")
    for url in [data_uri(data), f"http://127.0.0.1:{image_server}/ok/bad/{name}.jpg"]:
        resp = client.post("/v1/chat/completions", json=chat(image(url)))
        assert_error(resp, 413 if big else 400, "image_too_large" if big else "invalid_image")
        assert reason in resp.json()["error"]["message"]
        assert " at 0x" not in resp.text


@pytest.mark.parametrize("name", sorted(good_images()))
def test_awkward_valid_images_over_http(client, name):
    data, _, _ = good_images()[name]
    resp = client.post("/v1/chat/completions", json=chat(image(data_uri(data))))
    assert resp.status_code == 200, resp.text


def test_oversized_text_is_refused_before_tokenising(client):
    """20 MB of text: refused by the character bound (no tokenizer call), in well under a second of
    CPU; the body limit still admits every legitimate request."""
    frontend = client.frontend
    worker = frontend.backends["tiny-qwen2"].worker
    calls = []
    tok = worker.processor.tokenizer if hasattr(worker, "processor") else None
    if tok is not None:
        real = tok.encode
        tok.encode = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        text = "many words " * (20_000_000 // 11)
        t = time.perf_counter()
        resp = client.post("/v1/chat/completions", json=chat(text))
        elapsed = time.perf_counter() - t
    finally:
        if tok is not None:
            del tok.encode
    assert resp.status_code in (400, 413), resp.text
    assert resp.json()["error"]["code"] in ("prompt_exceeds_max_length", "request_too_large")
    assert not calls
    print(f"20 MB prompt refused in {elapsed:.3f} s")
    assert largest_request_bytes(frontend.args) == frontend.max_body_bytes
    # the largest legitimate request fits: max images at max bytes (base64) + max text
    assert frontend.max_body_bytes > 2 * DEFAULT_MAX_BYTES * 4 // 3 + max_prompt_chars(256)


def test_body_limit_streams(image_server):
    args = tiny_args(max_request_bytes=5000)
    frontend = Frontend(args, {m.name: _Never() for m in args.models})
    with TestClient(create_api(frontend)) as c:
        def gen():
            for _ in range(100):
                yield b" " * 1000  # chunked: no Content-Length to check up front
        resp = c.post("/v1/chat/completions", content=gen(), headers={"Content-Type": "application/json"})
        assert_error(resp, 413, "request_too_large")
        assert_error(c.post("/v1/chat/completions", content=b"x" * 6000, headers={"Content-Type": "application/json"}),
                     413, "request_too_large")


class _Never:
    async def stream(self, payload):
        raise AssertionError("a refused request reached the model")
        yield  # pragma: no cover
