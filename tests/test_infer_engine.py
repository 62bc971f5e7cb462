"""TorchEngine (no Ray), the torch backend of ``phantom_ray.infer.api``: batched greedy generation
equals one-at-a-time generation by a direct ``model.generate`` call, bad images become error
results, beam search equals an independent full-recompute beam search and the previous engine's
recorded output, sampling is reproducible per request key and batch-independent, streamed text
equals generated text, stop strings end a row, and checkpoints load from a directory and from S3.

``tests/data/engine_reference.json`` holds what the two engines this one replaced
(``infer/engine.py`` PhantomEngine and ``serving/engine.py`` BatchingEngine) produced on the tiny
presets, recorded before they were deleted: the same requests must give the same answers."""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import assert_implements_engine, greedy_reference, noise_png
from phantom_ray.infer import Event, Generation, Request, SamplingParams, load_engine
from phantom_ray.infer.torch_engine import TorchEngine
from phantom_ray.model.generation import beam_search
from phantom_ray.processing import PhantomProcessor

torch.set_num_threads(1)
REFERENCE = json.loads((Path(__file__).parent / "data" / "engine_reference.json").read_text())


def _load(preset: str = "tiny-qwen2") -> TorchEngine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_engine(preset, backend="torch", seed=0)


@pytest.fixture(scope="module")
def engine():
    return _load()


def _pairs(n: int = 12):
    prompts = ["Describe the image in detail.", "What colour dominates?", "Count the shapes, then explain."]
    # different sizes -> different tile counts -> different prompt lengths in one batch
    return [(noise_png(i, 20 + 9 * (i % 5), 18 + 13 * (i % 4)), prompts[i % 3]) for i in range(n)]


def _req(image, prompt: str, params: SamplingParams, key: str = "") -> Request:
    # no <image> placeholder: the processor puts the image first, as the captioning prompt does
    return Request(messages=[{"role": "user", "content": prompt}], images=[image] if image is not None else [],
                   params=params, key=key)


def _reqs(pairs, params: SamplingParams, keys=None) -> list[Request]:
    keys = keys or [str(i) for i in range(len(pairs))]
    return [_req(im, p, params, k) for (im, p), k in zip(pairs, keys)]


def _texts(gens) -> list[str | None]:
    return [g.text.strip() if g.text is not None else None for g in gens]


def test_preset_name_warns_random_weights():
    with pytest.warns(UserWarning, match="randomly initialised"):
        load_engine("tiny-qwen2", backend="torch")


def test_engine_implements_the_interface(engine):
    assert type(engine) is TorchEngine and engine.backend == "torch" and engine.model_id == "tiny-qwen2"
    assert_implements_engine(engine)
    [g] = engine.generate([Request.user("Hi", params=SamplingParams(max_tokens=2))])
    assert isinstance(g, Generation) and g.error is None and g.completion_tokens >= 1

    async def events():
        return [e async for e in engine.stream(Request.user("Hi", params=SamplingParams(max_tokens=2)))]

    got = asyncio.run(events())
    assert all(isinstance(e, Event) for e in got) and got[-1].type == "done"
    assert "".join(e.text for e in got if e.type == "delta") == g.text


def test_batched_greedy_equals_direct_generate_per_image(engine):
    pairs = _pairs()
    params = SamplingParams(max_tokens=10)
    batched = engine.generate(_reqs(pairs, params), batch_size=5)
    for (image, prompt), got in zip(pairs, batched):
        assert got.error is None
        assert got.text.strip() == greedy_reference(engine, image, prompt, 10)
        assert 1 <= got.completion_tokens <= 10 and got.finish_reason in ("stop", "length")
        assert got.prompt_tokens > 0
    assert len({g.num_tiles for g in batched}) > 1, "the batch should mix tile counts"
    # and the batch composition does not matter
    again = engine.generate(_reqs(list(reversed(pairs)), params), batch_size=3)
    assert [g.text for g in again] == [g.text for g in reversed(batched)]


def test_bad_images_become_error_results_without_stopping_the_batch(engine):
    good = _pairs(3)
    truncated = noise_png(99, 30, 30)[:40]
    pairs = [good[0], (b"", "x"), (b"not an image at all", "x"), good[1], (truncated, "x"), good[2]]
    out = engine.generate(_reqs(pairs, SamplingParams(max_tokens=4)), batch_size=8)
    assert [o.error for o in out] == [None, "empty_image", "undecodable_image", None, "undecodable_image", None]
    assert all(o.text is None and o.error_detail for o in out if o.error)
    assert [o.text.strip() for o in out if not o.error] == [greedy_reference(engine, im, p, 4) for im, p in good]


def test_text_only_prompt(engine):
    (out,) = engine.generate([_req(None, "Say something.", SamplingParams(max_tokens=5))])
    assert out.error is None and out.num_tiles == 0 and out.completion_tokens >= 1


def _reference_beam_search(model, ids: list[int], pixel_values, K: int, max_new: int, stops: set[int],
                           lp: float) -> list[int]:
    """Beam search by full recompute (no cache): every step reruns the whole sequence per beam."""
    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    done = False
    for step in range(max_new):
        cands = []
        for score, seq in beams:
            x = torch.tensor([ids + seq])
            logits = model(x, torch.ones_like(x), pixel_values).logits[0, -1]
            logp = torch.log_softmax(logits.double(), -1)
            top = logp.topk(2 * K)
            cands += [(score + float(v), seq + [int(t)]) for v, t in zip(top.values, top.indices)]
        cands.sort(key=lambda c: c[0], reverse=True)
        new = []
        for rank, (score, seq) in enumerate(cands[:2 * K]):
            if seq[-1] in stops:
                if rank < K:
                    finished.append((score / len(seq) ** lp, seq))
                continue
            new.append((score, seq))
            if len(new) == K:
                break
        beams = new
        if len(finished) >= K:
            finished = sorted(finished, key=lambda h: h[0], reverse=True)[:K]
            if beams[0][0] / (step + 1) ** lp <= finished[-1][0]:
                done = True
                break
    hyps = finished + ([] if done else [(s / len(q) ** lp, q) for s, q in beams])
    return max(hyps, key=lambda h: h[0])[1]


@torch.no_grad()
def test_beam_search_equals_full_recompute_reference(engine, monkeypatch):
    model = engine.model.to(torch.float64)  # cached vs recomputed logits agree to the last fp32 bit
    try:
        pairs = _pairs(3)
        # make tokens the random model actually emits (its 1st and 2nd greedy tokens) stop tokens, so
        # that hypotheses finish early and the stop bookkeeping is exercised (weights are seeded)
        inputs = engine._inputs([engine.prepare(_req(*p, SamplingParams())) for p in pairs])
        greedy = engine.model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                       max_new_tokens=3, stop_token_ids=[-1])
        stops = list(engine.processor.stop_token_ids) + sorted(set(greedy.sequences[:, :2].flatten().tolist()))
        monkeypatch.setattr(PhantomProcessor, "stop_token_ids", property(lambda self: stops))
        batched = engine.generate(_reqs(pairs, SamplingParams(max_tokens=8, num_beams=3)), batch_size=3)
        for (image, prompt), got in zip(pairs, batched):
            s = engine.processor.encode_prompt(prompt, images=image)
            pv = s.pixel_values.to(torch.float64)
            want = _reference_beam_search(model, s.input_ids.tolist(), pv, 3, 8, set(stops), 1.0)
            assert got.completion_tokens == len(want)
            assert got.text.strip() == engine.processor.decode_generation(want)
        assert any(g.finish_reason == "stop" for g in batched), "no hypothesis hit a stop token"
        # one beam is greedy decoding
        one = beam_search(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"].to(torch.float64),
                          num_beams=1, max_new_tokens=8, stop_token_ids=stops, pad_token_id=engine.processor.pad_token_id)
        g1 = engine.generate(_reqs(pairs, SamplingParams(max_tokens=8)))
        assert [engine.processor.decode_generation(ids) for ids, _ in one] == _texts(g1)
    finally:
        engine.model.to(torch.float32)


REFERENCE_PARAMS = {
    "beam3": SamplingParams(max_tokens=8, num_beams=3),
    "beam2_lp0.5": SamplingParams(max_tokens=6, num_beams=2, length_penalty=0.5),
    "greedy": SamplingParams(max_tokens=10),
    "sample": SamplingParams(max_tokens=10, temperature=1.5, top_p=0.9, seed=7),
}


def _reference_pairs():
    return _pairs(4) + [(None, "Say something.")]


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-internlm2", "tiny-phi3"])
def test_outputs_equal_the_replaced_engines(preset):
    """Beam search, greedy and seeded sampling give what PhantomEngine gave, and streamed answers
    (with a stop string) what the serving BatchingEngine gave, on all three families."""
    eng = _load(preset)
    ref = REFERENCE[preset]
    pairs = _reference_pairs()
    keys = [f"k{i}" for i in range(len(pairs))]
    samples = [eng.prepare(_req(*p, SamplingParams())) for p in pairs]
    inputs = eng._inputs(samples)
    for name, params in REFERENCE_PARAMS.items():
        if params.num_beams > 1:  # the moved beam search itself, token for token
            seqs = beam_search(eng.model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                               num_beams=params.num_beams, max_new_tokens=params.max_tokens,
                               stop_token_ids=eng.processor.stop_token_ids, pad_token_id=eng.processor.pad_token_id,
                               length_penalty=params.length_penalty)
            assert [{"ids": ids, "finish_reason": fr} for ids, fr in seqs] == ref[name], name
        gens = eng.generate(_reqs(pairs, params, keys))
        got = [{"text": g.text.strip(), "tokens": g.completion_tokens, "finish_reason": g.finish_reason} for g in gens]
        assert got == ref[name + "_text"], name

    async def served():
        out = []
        for i, (img, p) in enumerate(pairs[:3]):
            r = Request([{"role": "user", "content": ("<image>\n" if img else "") + p}], images=[img] if img else [],
                        params=SamplingParams(max_tokens=12, stop=["e"] if i == 2 else []))
            events = [e async for e in eng.stream(r)]
            out.append({"text": "".join(e.text for e in events if e.type == "delta"),
                        "done": {"type": events[-1].type, "finish_reason": events[-1].finish_reason,
                                 "prompt_tokens": events[-1].prompt_tokens,
                                 "completion_tokens": events[-1].completion_tokens}})
        return out

    assert asyncio.run(served()) == ref["served"]


def test_sampling_is_reproducible_per_key_and_batch_invariant(engine):
    pairs = _pairs(4)
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=7)
    a = engine.generate(_reqs(pairs, params, ["a", "b", "c", "d"]))
    b = engine.generate(_reqs([pairs[2], pairs[0]], params, ["c", "a"]))
    assert [b[1].text, b[0].text] == [a[0].text, a[2].text]
    other_seed = engine.generate(_reqs(pairs, params.replace(seed=8), ["a", "b", "c", "d"]))
    greedy = engine.generate(_reqs(pairs, SamplingParams(max_tokens=12), ["a", "b", "c", "d"]))
    assert [x.text for x in other_seed] != [x.text for x in a]
    assert [x.text for x in greedy] != [x.text for x in a]


def _stream_all(engine, requests: list[Request]):
    """Stream every request concurrently (they share batches); (text, last event) per request."""
    async def one(r):
        events = [e async for e in engine.stream(r)]
        assert all(e.type == "delta" for e in events[:-1])
        return "".join(e.text for e in events[:-1]), events[-1]

    async def main():
        return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(main())


def test_streamed_text_equals_generated_text(engine):
    pairs = _pairs(6)
    for params in (SamplingParams(max_tokens=16, ignore_eos=True), SamplingParams(max_tokens=16, temperature=1.2, seed=3)):
        reqs = _reqs(pairs, params, [f"s{i}" for i in range(len(pairs))])
        gens = engine.generate(reqs)
        n_before = len(engine.batch_sizes)
        streamed = _stream_all(engine, reqs)
        assert max(engine.batch_sizes[n_before:]) > 1, "concurrent streams were not batched"
        for g, (text, done) in zip(gens, streamed):
            assert text == g.text
            assert (done.type, done.finish_reason, done.completion_tokens, done.prompt_tokens) == \
                ("done", g.finish_reason, g.completion_tokens, g.prompt_tokens)


def test_stop_strings_end_the_row_in_generate_and_stream(engine):
    image, prompt = _pairs(2)[1]
    full = engine.generate([_req(image, prompt, SamplingParams(max_tokens=24, ignore_eos=True))])[0]
    assert full.finish_reason == "length" and len(full.text) >= 6
    stop = full.text[3:5]
    cut = full.text[: full.text.find(stop)]
    params = SamplingParams(max_tokens=24, ignore_eos=True, stop=("never-there", stop))
    (g,) = engine.generate([_req(image, prompt, params)])
    assert g.text == cut and g.finish_reason == "stop" and g.completion_tokens < 24
    [(text, done)] = _stream_all(engine, [_req(image, prompt, params)])
    assert text == cut and done.finish_reason == "stop"


def test_stream_rejects_a_bad_request_with_an_error_event(engine):
    bad = _req(b"not an image at all", "x", SamplingParams(max_tokens=4))
    long = _req(None, "word " * 5000, SamplingParams(max_tokens=4))
    good = _req(None, "Say something.", SamplingParams(max_tokens=4))
    (b, b_ev), (l, l_ev), (g, g_ev) = _stream_all(engine, [bad, long, good])
    assert (b, b_ev.type, b_ev.status, b_ev.code) == ("", "error", 400, "undecodable_image")
    assert (l_ev.type, l_ev.status, l_ev.code) == ("error", 400, "prompt_exceeds_max_length")
    assert g_ev.type == "done"


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(num_beams=0), dict(num_beams=2, temperature=1.0),
                                 dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1)])
def test_sampling_params_reject_bad_settings(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def _save_checkpoint(engine, where: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        engine.tokenizer.save_pretrained(tmp)
        extra = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    engine.model.save_pretrained(where, extra_files=extra)


def test_load_checkpoint_from_directory_and_s3(engine, tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("PHANTOM_RAY_CACHE", str(tmp_path / "cache"))
    reqs = _reqs(_pairs(3), SamplingParams(max_tokens=6))
    want = [g.text for g in engine.generate(reqs)]
    local = str(tmp_path / "ckpt")
    _save_checkpoint(engine, local)
    from_dir = load_engine(local, backend="torch")
    assert from_dir.model_id == local
    assert [g.text for g in from_dir.generate(reqs)] == want
    uri = f"{s3_bucket}/export/tiny"
    _save_checkpoint(engine, uri)
    from_s3 = load_engine(uri, backend="torch", dtype="float32")
    assert [g.text for g in from_s3.generate(reqs)] == want


def test_mixed_sampling_settings_share_a_batch_and_equal_each_alone(engine):
    pairs = _pairs(4)
    settings = [SamplingParams(max_tokens=10), SamplingParams(max_tokens=10, temperature=0.7, seed=1),
                SamplingParams(max_tokens=10, temperature=1.5, top_p=0.8, seed=1), SamplingParams(max_tokens=6)]
    reqs = [_req(im, p, s, key=f"m{i}") for i, ((im, p), s) in enumerate(zip(pairs, settings))]
    n_before = len(engine.batch_sizes)
    together = engine.generate(reqs, batch_size=4)
    assert engine.batch_sizes[n_before:] == [4], "greedy and sampled rows should share one batch"
    alone = [engine.generate([r])[0] for r in reqs]
    assert [g.text for g in together] == [g.text for g in alone]
    assert [g.completion_tokens for g in together] == [g.completion_tokens for g in alone]
    assert together[3].completion_tokens <= 6


def test_backends_are_found_by_name_through_the_registry(monkeypatch):
    """``load_engine`` resolves ``ENGINES[name]`` ("module:Class") with importlib: a new backend is
    one registry line, and infer never imports the vllm package itself."""
    import phantom_ray.infer.api as api

    assert api.engine_class("torch") is TorchEngine
    assert api.ENGINES["vllm"] == "phantom_ray.vllm.engine:VLLMEngine"
    with pytest.raises(ValueError, match="unknown engine backend 'tpu'"):
        load_engine("tiny-qwen2", backend="tpu")

    class Fake:
        @classmethod
        def load(cls, model_id, **options):
            return (model_id, options)

    monkeypatch.setitem(api.ENGINES, "fake", f"{__name__}:_FAKE_ENGINE")
    monkeypatch.setitem(globals(), "_FAKE_ENGINE", Fake)
    assert load_engine("m", backend="fake", dtype="float32") == ("m", {"dtype": "float32"})
