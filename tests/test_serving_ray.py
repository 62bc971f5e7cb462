"""The Serve application on local Ray (2 CPUs), reached over HTTP with the official ``openai``
client: two model names, images, streaming and not; sixteen concurrent requests answer exactly as
one at a time (and were batched); malformed requests get OpenAI errors and the server keeps
serving; a full model queue answers 503. One application for the module (~30-60 s in all)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from helpers import data_uri, free_port, png_bytes
from serving_helpers import request_variants, tiny_args

APP = "phantom-test"


@pytest.fixture(scope="module")
def server(ray_local):
    from ray import serve

    from phantom_ray.serving.app import build_app

    port = free_port()
    # tiny-internlm2 gets a one-request replica and a one-request queue, for the backpressure test
    args = tiny_args(model_overrides={"tiny-internlm2": {"max_ongoing_requests": 1, "max_queued_requests": 1,
                                                         "max_batch_size": 1}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    try:
        yield base
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def _messages(text: str, image: bool = True):
    content = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_uri(png_bytes((48, 40), (20, 160, 60)))}})
    return [{"role": "user", "content": content}]


def test_openai_client_two_models_with_image_streaming_and_not(client):
    assert sorted(m.id for m in client.models.list()) == ["tiny-internlm2", "tiny-qwen2"]
    answers = {}
    for model in ("tiny-qwen2", "tiny-internlm2"):
        kw = dict(model=model, messages=_messages("what is in the picture?"), max_tokens=16, temperature=0,
                  extra_body={"ignore_eos": True})
        out = client.chat.completions.create(**kw)
        assert out.model == model
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 16
        text = out.choices[0].message.content
        assert text
        stream = client.chat.completions.create(**kw, stream=True)
        chunks = list(stream)
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(pieces) == text, f"{model}: streamed text differs from the non-streaming answer"
        assert sum(1 for p in pieces if p) >= 2, f"{model}: not streamed token by token"
        assert chunks[-1].choices[0].finish_reason == "length"
        answers[model] = text
    assert answers["tiny-qwen2"] != answers["tiny-internlm2"], "both names reached the same model"


def test_sixteen_concurrent_requests_equal_one_at_a_time(server, client):
    import openai
    from ray import serve

    bodies = request_variants(16)

    def kwargs(b):
        return dict(model=b["model"], messages=b["messages"], max_tokens=b["max_tokens"], temperature=0,
                    extra_body={"ignore_eos": b["ignore_eos"]})

    sequential = []
    for b in bodies:
        out = client.chat.completions.create(**kwargs(b))
        sequential.append((out.choices[0].message.content, out.choices[0].finish_reason, out.usage.completion_tokens))

    async def concurrent():
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            outs = await asyncio.gather(*(aclient.chat.completions.create(**kwargs(b)) for b in bodies))
        finally:
            await aclient.close()
        return [(o.choices[0].message.content, o.choices[0].finish_reason, o.usage.completion_tokens) for o in outs]

    handle = serve.get_deployment_handle("PhantomModel-tiny-qwen2", app_name=APP)
    before = handle.stats.remote().result()
    parallel = asyncio.run(concurrent())
    after = handle.stats.remote().result()
    assert parallel == sequential
    assert len({s[0] for s in sequential}) > 8
    assert after["max_batch_size"] > 1, f"16 concurrent requests were never batched: {after}"
    assert after["requests"]["ok"] - before["requests"]["ok"] == 16
    assert after["batches"] - before["batches"] < 16


def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    import openai

    cases = [
        (openai.BadRequestError, dict(model="tiny-qwen2", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}])),
        (openai.BadRequestError, dict(model="tiny-qwen2", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(png_bytes()[:70])}}]}])),  # fails in the replica
        (openai.BadRequestError, dict(model="tiny-qwen2", messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "x"}}]}])),
        (openai.BadRequestError, dict(model="tiny-qwen2", messages=[{"role": "user", "content": "word " * 400}])),
        (openai.NotFoundError, dict(model="phantom-70b", messages=[{"role": "user", "content": "hi"}])),
        (openai.APIStatusError, dict(model="tiny-qwen2", messages=_messages("x") + [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(png_bytes((600, 600)))}}]}])),
    ]
    statuses = []
    for exc_type, kw in cases:
        with pytest.raises(exc_type) as info:
            client.chat.completions.create(max_tokens=4, temperature=0, **kw)
        err = info.value.body
        assert isinstance(err, dict) and err.get("message") and "type" in err and "code" in err, err
        statuses.append(info.value.status_code)
    assert statuses == [400, 400, 400, 400, 404, 413]
    out = client.chat.completions.create(model="tiny-qwen2", messages=_messages("ok?"), max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_full_model_queue_answers_503_then_recovers(server):
    # tiny-internlm2: one request running, one queued; the others are refused with 503 + Retry-After
    body = {"model": "tiny-internlm2", "messages": [{"role": "user", "content": "count"}], "max_tokens": 128,
            "temperature": 0, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(f"{server}/v1/chat/completions", json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    assert set(codes) <= {200, 503}
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.json()["error"]["code"] == "model_overloaded"
    assert refused.headers.get("retry-after") == "1"
    ok = httpx.post(f"{server}/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
