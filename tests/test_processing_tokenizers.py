"""Tokenizers: tiny local BPE, checkpoint directories (tokenizer.json / SentencePiece), S3, id checks."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch

from phantom_ray.model.config import TINY_SPECIAL_TOKENS, PhantomConfig
from phantom_ray.processing import (
    PhantomProcessor,
    SentencePieceTokenizer,
    build_tiny_tokenizer,
    load_tokenizer,
)
from phantom_ray.processing.tokenizers import _TINY_CORPUS, _tiny_tokenizer_json

torch.set_num_threads(1)


@pytest.mark.parametrize("template", ["chatml", "phi3"])
def test_tiny_tokenizer_is_deterministic_with_specials_first(template):
    assert _tiny_tokenizer_json.__wrapped__(template) == _tiny_tokenizer_json.__wrapped__(template)
    tok = build_tiny_tokenizer(template)
    specials = TINY_SPECIAL_TOKENS[template]
    assert [tok.convert_tokens_to_ids(t) for t in specials] == list(range(len(specials)))
    assert len(tok) <= 384
    end = "<|im_end|>" if template == "chatml" else "<|end|>"
    assert tok.eos_token == tok.pad_token == end and tok.pad_token_id == specials.index(end)
    text = "The big green triangle is above 3 red circles. Ünïcode ✓"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # the corpus words are learned: colour/shape words take at most two tokens
    for w in (" red", " green", " blue", " circle", " square", " triangle", " three"):
        assert len(tok.encode(w, add_special_tokens=False)) <= 2, w


def test_image_token_mismatch_names_both_ids():
    cfg = PhantomConfig.from_preset("tiny-qwen2", image_token_index=99)
    with pytest.raises(ValueError, match=r"id 5 .*image_token_index is 99"):
        load_tokenizer("tiny-qwen2", cfg)


def test_saved_tokenizer_directory_round_trips(tmp_path):
    cfg = PhantomConfig.from_preset("tiny-phi3")
    tok = build_tiny_tokenizer("phi3")
    tok.save_pretrained(tmp_path)
    cfg.save(tmp_path)
    loaded = load_tokenizer(str(tmp_path))  # config.json next to it is checked too
    text = "<|user|>\nWhat color?<|end|><|assistant|>\n"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.pad_token_id == tok.pad_token_id


def _train_sentencepiece(tmp_path) -> tuple[str, dict]:
    """An InternLM2-style checkpoint directory: SentencePiece model with <|im_start|>/<|im_end|> as
    user-defined pieces, image tokens in added_tokens.json after the SentencePiece vocab."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_TINY_CORPUS * 3)
    prefix = tmp_path / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=300, model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
    )
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (prefix.with_suffix(".model")).rename(ckpt / "tokenizer.model")
    added = {"<img>": 300, "</img>": 301, "<IMG_CONTEXT>": 302}
    (ckpt / "added_tokens.json").write_text(json.dumps(added))
    return str(ckpt), added


def test_sentencepiece_checkpoint_tokenizer(tmp_path):
    ckpt, added = _train_sentencepiece(tmp_path)
    cfg = PhantomConfig.from_preset(
        "tiny-internlm2", image_token_index=302, img_start_token_index=300, img_end_token_index=301,
        eos_token_id=None)
    tok = load_tokenizer(ckpt, cfg)
    assert isinstance(tok, SentencePieceTokenizer)
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    cfg.eos_token_id = end_id
    proc = PhantomProcessor(cfg, tok, max_length=256)
    assert proc.end_token_id == end_id and proc.pad_token_id == end_id
    answer = "The circle is red."
    s = proc.encode([{"role": "user", "content": "What color is the circle?"},
                     {"role": "assistant", "content": answer}],
                    images=torch.zeros(3, 32, 32, dtype=torch.uint8))
    sup = s.labels[s.labels != -100].tolist()
    assert sup == tok.encode(answer) + [end_id]
    assert proc.decode(sup) == answer
    # prompt ids equal tokenizing the expanded prompt string (split on added tokens, SP in between)
    p = proc.encode_prompt("What color is the circle?", images=torch.zeros(3, 32, 32, dtype=torch.uint8))
    text = proc.build_prompt([{"role": "user", "content": "What color is the circle?"}], num_tiles=p.num_tiles)
    assert p.input_ids.tolist() == tok.encode(text)
    assert int((p.input_ids == 302).sum()) == 4
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == tok.encode(text)
    # a wrong config id is caught
    with pytest.raises(ValueError, match="302"):
        load_tokenizer(ckpt, PhantomConfig.from_preset("tiny-internlm2"))


def test_tokenizer_from_s3(tmp_path, monkeypatch, s3_bucket):
    from phantom_ray.storage import upload_dir

    cfg = PhantomConfig.from_preset("tiny-qwen2")
    local = tmp_path / "ckpt"
    build_tiny_tokenizer("chatml").save_pretrained(local)
    (local / "model.safetensors").write_bytes(b"weights are not downloaded for a tokenizer")
    upload_dir(str(local), f"{s3_bucket}/models/tiny")
    monkeypatch.setenv("PHANTOM_RAY_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer(f"{s3_bucket}/models/tiny", cfg)
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == cfg.image_token_index
    cached = list((tmp_path / "cache").rglob("*"))
    assert any(p.name == "tokenizer.json" for p in cached)
    assert not any(p.name == "model.safetensors" for p in cached)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(f"{s3_bucket}/nothing/here", cfg)


def test_processing_imports_without_ray():
    code = ("import sys; sys.modules['ray'] = None; sys.modules['deepspeed'] = None\n"
            "import phantom_ray.processing as p\n"
            "from phantom_ray.model.config import PhantomConfig\n"
            "c = PhantomConfig.from_preset('tiny-qwen2')\n"
            "proc = p.PhantomProcessor(c, p.load_tokenizer('tiny-qwen2', c))\n"
            "print(len(proc.encode_prompt('hi')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
