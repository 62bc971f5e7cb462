"""InternLM2-family exports (SentencePiece, InternVL2's remote-code ``InternLM2Tokenizer`` in
tokenizer_config.json) carry a ``tokenizer.json`` that transformers' AutoTokenizer (and so vLLM)
loads without ``trust_remote_code``, giving exactly our ``SentencePieceTokenizer``'s ids and text."""

from __future__ import annotations

import json

import pytest
from chat_table import CHATS
from upstream_checkpoints import INTERNVL_TOKENS, _sentencepiece

from phantom_ray.model.config import PhantomConfig
from phantom_ray.processing import PhantomProcessor, SentencePieceTokenizer, load_tokenizer, save_tokenizer
from phantom_ray.processing.tokenizers import _TINY_CORPUS, _sentencepiece_from_dir
from phantom_ray.vllm.inputs import compact_image_tokens

TEXTS = [
    "The big green triangle is above 3 red circles.", "  two leading spaces", " one leading space",
    "trailing  ", "a  b   c", "tab\there", "", " ", "\n", "line\nbreak\n\n", "12345 digits 0.75",
    "Ünïcode ✓ 🙂 日本語 ẞ", "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat colour?<|im_end|>\n"
    "<|im_start|>assistant\n", "x<|im_end|> y", "<ref>circle</ref><box>[[1, 2, 3, 4]]</box>", "<s> <unk> as text",
]


def _byte_fallback_dir(d):
    """InternLM2's real settings: BPE with byte fallback, identity normalisation, split digits."""
    import sentencepiece as spm

    d.mkdir(parents=True, exist_ok=True)
    (d / "corpus.txt").write_text(_TINY_CORPUS * 3)
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=400, model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    (d / "sp.model").rename(d / "tokenizer.model")
    (d / "added_tokens.json").write_text(json.dumps({t: 400 + i for i, t in enumerate(INTERNVL_TOKENS)}))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


@pytest.fixture(scope="module", params=["upstream-layout", "byte-fallback"])
def export(request, tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    if request.param == "upstream-layout":
        _sentencepiece(src, added=INTERNVL_TOKENS)
    else:
        _byte_fallback_dir(src)
    ours = _sentencepiece_from_dir(src, "<|im_end|>")
    ids = {t: ours.convert_tokens_to_ids(t) for t in ("<IMG_CONTEXT>", "<img>", "</img>")}
    config = PhantomConfig.from_preset("tiny-internlm2", image_token_index=ids["<IMG_CONTEXT>"],
                                       img_start_token_index=ids["<img>"], img_end_token_index=ids["</img>"])
    out = tmp_path_factory.mktemp(f"export-{request.param}")
    save_tokenizer(ours, config, out)
    return ours, config, out


def test_autotokenizer_loads_without_remote_code(export):
    from transformers import AutoTokenizer

    ours, _, out = export
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in cfg and cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    hf = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    assert type(hf).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    for t in ["<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS]:
        assert hf.convert_tokens_to_ids(t) == ours.convert_tokens_to_ids(t), t
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == ours.eos_token_id
    assert hf.pad_token_id == ours.pad_token_id


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_and_text(export, text):
    from transformers import AutoTokenizer

    ours, _, out = export
    hf = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    ids = ours.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == ours.decode(ids)
    # our own loader reads the export back (it picks tokenizer.json) to the same ids and text
    back = load_tokenizer(str(out), export[1])
    assert back.encode(text, add_special_tokens=False) == ids and back.decode(ids) == ours.decode(ids)


def test_decode_round_trips(export):
    """HF decode(encode(text)) is ours; with byte fallback and identity normalisation (InternLM2's
    settings) that is the text itself, emoji and CJK included (leading spaces aside: SentencePiece
    drops them on decode)."""
    from transformers import AutoTokenizer

    ours, _, out = export
    hf = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    lossless = ours.decode(ours.encode("Ünïcode ✓ 🙂\n")) == "Ünïcode ✓ 🙂\n"
    assert lossless == ("byte-fallback" in out.name)  # the upstream-layout tiny model is NFKC, no byte fallback
    for text in TEXTS:
        assert hf.decode(hf.encode(text, add_special_tokens=False)) == ours.decode(ours.encode(text))
        if lossless and not text.startswith(" "):
            assert hf.decode(hf.encode(text, add_special_tokens=False)) == text, text


@pytest.mark.parametrize("name,messages,images", CHATS, ids=[c[0] for c in CHATS])
def test_apply_chat_template_equals_processor(export, name, messages, images, request):
    from transformers import AutoTokenizer

    ours, config, out = export
    if "byte-fallback" in out.name and any(m["role"] == "assistant" and m["content"] for m in messages):
        # PhantomProcessor encodes an assistant answer on its own (its label span), so with a
        # dummy-prefix SentencePiece model the answer starts with an extra "\u2581" the template's
        # one string does not have (the NFKC upstream-layout model hides it: "\n" is dropped)
        request.applymarker(pytest.mark.xfail(strict=True, reason="processor: answer encoded apart gets a dummy prefix"))
    proc = PhantomProcessor(config, ours, max_length=8192)
    hf = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    got = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    ids = proc.encode(messages, images=images, add_generation_prompt=True).input_ids.tolist()
    assert got == compact_image_tokens(ids, proc.img_start_id, proc.image_token_id, proc.img_end_id)


@pytest.mark.parametrize("route", ["internvl2", "vision+llm"])
def test_model_init_export_loads_without_remote_code(tmp_path, route):
    """`model init` of an InternLM2-family checkpoint: the export's tokenizer loads in
    AutoTokenizer without remote code, ids and text equal to ours read from the source."""
    from transformers import AutoTokenizer

    from phantom_ray.convert import init_checkpoint
    from upstream_checkpoints import write_internvl2, write_vision_and_llm

    if route == "internvl2":
        src = write_internvl2(tmp_path / "src", "internlm2")
        init_checkpoint("tiny-internlm2", str(tmp_path / "out"), source=str(src))
        ours = _sentencepiece_from_dir(src, "<|im_end|>")
    else:
        vision, llm = write_vision_and_llm(tmp_path / "src", "internlm2")
        res = init_checkpoint("tiny-internlm2", str(tmp_path / "out"), vision=str(vision), llm=str(llm))
        ours = _sentencepiece_from_dir(llm, "<|im_end|>")
        ours.add_tokens(list(res.added_tokens))
    out = tmp_path / "out"
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    hf = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    back = load_tokenizer(str(out))
    for text in TEXTS:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert back.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids) == ours.decode(ids), text
