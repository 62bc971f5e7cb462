"""Exports carry Phantom's prompt as a chat template: after a save/load round trip,
``tokenizer.apply_chat_template`` gives exactly ``PhantomProcessor``'s ids for every family, with
images as ``<img></img>`` (vLLM's placeholder for the model, which its multimodal processor expands
to the processor's ``<img>`` + ``<IMG_CONTEXT>`` x K + ``</img>``)."""

from __future__ import annotations

import json

import pytest
from chat_table import CHATS, SYSTEM, A, _part

from phantom_ray.model.config import PhantomConfig
from phantom_ray.processing import PhantomProcessor, build_tiny_tokenizer, chat_template, load_tokenizer, save_tokenizer
from phantom_ray.processing.errors import SampleError
from phantom_ray.vllm.inputs import compact_image_tokens

FAMILIES = ["tiny-qwen2", "tiny-internlm2", "tiny-phi3"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """The family's processor, and its tokenizer saved next to a model and loaded back."""
    config = PhantomConfig.from_preset(request.param)
    tok = build_tiny_tokenizer(config.template)
    d = tmp_path_factory.mktemp(request.param)
    save_tokenizer(tok, config, d)
    return config, PhantomProcessor(config, tok, max_length=8192), load_tokenizer(str(d), config), d


@pytest.mark.parametrize("name,messages,images", CHATS, ids=[c[0] for c in CHATS])
def test_apply_chat_template_equals_processor(family, name, messages, images):
    _, proc, tok, _ = family
    got = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    sample = proc.encode(messages, images=images, add_generation_prompt=True)
    ids = sample.input_ids.tolist()
    assert got == compact_image_tokens(ids, proc.img_start_id, proc.image_token_id, proc.img_end_id)
    # <img></img> expanded with the processor's tile counts is the processor's prompt, token for token
    expanded, tiles = [], iter(sample.num_tiles)
    for t in got:
        expanded.append(t)
        if t == proc.img_start_id:
            expanded += [proc.image_token_id] * (proc.num_image_token * next(tiles))
    assert expanded == ids
    # without the generation prompt too (a chat ending on the user turn)
    plain = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, return_dict=False)
    n_gen = len(proc.tokenizer.encode(proc.rule["assistant_start"], add_special_tokens=False))
    assert plain == got[:-n_gen]


def test_export_files_carry_the_template(family):
    config, _, tok, d = family
    want = chat_template(config.template)
    assert (d / "chat_template.jinja").read_text() == want
    assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] == want
    assert tok.chat_template == want
    # where vLLM and transformers read a model's stop ids: the processor's stop tokens
    gen = json.loads((d / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(gen if isinstance(gen, list) else [gen]) == sorted(PhantomProcessor(config, tok).stop_token_ids)


def test_template_refuses_what_the_processor_refuses(family):
    _, proc, tok, _ = family
    bad = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}]
    with pytest.raises(SampleError):
        proc.encode(bad, add_generation_prompt=True)
    with pytest.raises(Exception, match="alternating"):
        tok.apply_chat_template(bad, tokenize=False, add_generation_prompt=True)
    with pytest.raises(Exception, match="user turns"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": [_part(A)]}], tokenize=False)


def test_vllm_reads_the_template_as_openai_content():
    """vLLM hands image parts to the template in place (content format "openai") only when it sees
    the template loop over ``message['content']``; the "string" format would join them with newlines."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from vllm.renderers.hf import _detect_content_format

    for template in ("chatml", "phi3"):
        assert _detect_content_format(chat_template(template), default="string") == "openai"


def test_preset_directory_carries_the_template(tmp_path, monkeypatch):
    """The directory vLLM loads a preset from is written through the same tokenizer save."""
    import warnings

    from phantom_ray.loader import local_model_dir

    monkeypatch.setenv("PHANTOM_RAY_CACHE", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = local_model_dir("tiny-phi3", seed=0)
    assert (d / "chat_template.jinja").read_text() == chat_template("phi3")
