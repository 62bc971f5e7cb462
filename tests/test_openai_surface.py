"""The OpenAI surface beyond a plain chat on the torch engine, in process (no Ray): ``n`` choices,
``seed``, ``/v1/completions`` (a raw prompt equals the chat it renders), ``/metrics``; and the vLLM
features it lacks (``logprobs``, ``response_format``) refused with a 400 naming the engine. The same
requests on the vllm engine: tests/test_serving_vllm.py."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from phantom_ray.serving.api import Frontend, create_api
from phantom_ray.serving.metrics import merge_prometheus
from phantom_ray.serving.worker import ModelWorker
from serving_helpers import WorkerBackend, tiny_args

torch.set_num_threads(1)
MODEL = "tiny-qwen2"


@pytest.fixture(scope="module")
def client():
    args = tiny_args()
    args.models = [m for m in args.models if m.name == MODEL]
    worker = ModelWorker(args.models[0], max_image_pixels=args.max_image_pixels)

    async def metrics():
        return merge_prometheus([("r0", worker.metrics_text())])

    frontend = Frontend(args, {MODEL: WorkerBackend(worker)}, metrics=metrics)
    with TestClient(create_api(frontend)) as c:
        c.worker = worker
        yield c


def chat(content="what is it?", **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, **kw}


@pytest.mark.parametrize("field,value", [("logprobs", True), ("response_format", {"type": "json_object"}),
                                         ("response_format", {"type": "json_schema", "json_schema": {
                                             "name": "x", "schema": {"type": "object"}}})])
def test_vllm_only_fields_are_refused_naming_the_engine(client, field, value):
    resp = client.post("/v1/chat/completions", json=chat(**{field: value}))
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["code"] == "unsupported_parameter" and "torch engine" in err["message"], err
    assert field.split("_")[0] in err["message"]
    legacy = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "logprobs": 1})
    assert legacy.status_code == 400 and "torch engine" in legacy.json()["error"]["message"]


def test_n_choices_greedy_and_seeded(client):
    out = client.post("/v1/chat/completions", json=chat(n=3)).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in out["choices"]}) == 1  # greedy: n equal answers
    assert out["usage"]["completion_tokens"] == 15
    sampled = chat(n=2, temperature=1.0, seed=7, max_tokens=8)
    a = client.post("/v1/chat/completions", json=sampled).json()
    b = client.post("/v1/chat/completions", json=sampled).json()
    assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]
    assert a["choices"][0]["message"]["content"] != a["choices"][1]["message"]["content"]
    other = client.post("/v1/chat/completions", json={**sampled, "seed": 8}).json()
    assert [c["message"]["content"] for c in other["choices"]] != [c["message"]["content"] for c in a["choices"]]


def test_n_choices_stream(client):
    import json

    chunks = []
    with client.stream("POST", "/v1/chat/completions", json=chat(n=2, stream=True,
                                                                  stream_options={"include_usage": True})) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = {0: "", 1: ""}
    finish = {}
    for c in chunks:
        for ch in c["choices"]:
            text[ch["index"]] += ch["delta"].get("content") or ""
            if ch["finish_reason"]:
                finish[ch["index"]] = ch["finish_reason"]
    full = client.post("/v1/chat/completions", json=chat(n=1)).json()["choices"][0]["message"]["content"]
    assert text == {0: full, 1: full} and finish == {0: "length", 1: "length"}
    assert chunks[-1]["usage"]["completion_tokens"] == 10


def test_completions_raw_prompt_equals_chat(client):
    """The rendered chat sent as a raw prompt gives the chat's answer (same ids, no template added)."""
    proc = client.worker.processor
    text = proc.build_prompt([{"role": "user", "content": "what is it?"}])
    assert proc.tokenizer.encode(text, add_special_tokens=False) == \
        proc.encode([{"role": "user", "content": "what is it?"}], add_generation_prompt=True).input_ids.tolist()
    want = client.post("/v1/chat/completions", json=chat(max_tokens=8)).json()["choices"][0]["message"]["content"]
    got = client.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 8, "temperature": 0,
                                              "ignore_eos": True}).json()
    assert got["object"] == "text_completion" and got["choices"][0]["text"] == want
    # a raw prompt may not carry image markers (text only), nor be a batch
    bad = client.post("/v1/completions", json={"model": MODEL, "prompt": "<img></img>", "max_tokens": 2})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "reserved_token_in_text"
    batch = client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2})
    assert batch.status_code == 400 and batch.json()["error"]["param"] == "prompt"
    echo = client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "echo": True})
    assert echo.status_code == 400 and echo.json()["error"]["code"] == "unsupported_parameter"


def test_metrics_prometheus_text(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/v1/chat/completions", json=chat())
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(resp.text)}
    tokens = fams["phantom_completion_tokens"].samples[0]
    assert tokens.labels == {"model_name": MODEL, "replica": "r0"} and tokens.value > 0


def test_merge_prometheus_labels_replicas_and_joins_families():
    from prometheus_client.parser import text_string_to_metric_families

    a = "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 2.0\n"
    b = "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 3.0\n"
    fams = list(text_string_to_metric_families(merge_prometheus([("r1", a), ("r2", b)])))
    assert len(fams) == 1
    assert sorted((s.labels["replica"], s.value) for s in fams[0].samples) == [("r1", 2.0), ("r2", 3.0)]
