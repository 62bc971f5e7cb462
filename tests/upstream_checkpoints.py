"""Tiny checkpoints in the upstream layouts ``phantom-ray model init`` reads (docs/checkpoints.md), for tests.

    from upstream_checkpoints import write_internvl2, write_vision_and_llm
    src = write_internvl2(tmp_path / "internvl2", "qwen2")                       # -> Path
    vision_dir, llm_dir = write_vision_and_llm(tmp_path / "parts", "internlm2")   # -> (Path, Path)
    # then: phantom-ray model init --size tiny-qwen2 --source <src> --output ...
    #       phantom-ray model init --size tiny-internlm2 --vision <vision_dir> --llm <llm_dir> --output ...

Families ``qwen2``, ``internlm2``, ``phi3`` at the shapes of the ``tiny-<family>`` presets
(``TINY_SIZE[family]``). The layouts are written from the upstream descriptions, not from our model:

* InternVL2 (``write_internvl2``): ``config.json`` with ``vision_config`` / ``llm_config`` /
  ``template`` / ``downsample_ratio`` / ``ps_version`` / ``select_layer``; tensors ``vision_model.*``
  (InternViT keys, listed here by hand), ``mlp1.{0,1,3}.*`` and ``language_model.*``: the state dict
  of transformers' own ``Qwen2ForCausalLM`` / ``Phi3ForCausalLM``, or for InternLM2 (not in
  transformers) the hand-written InternLM2 keys with a packed ``wqkv``; the tokenizer InternVL2 ships
  (with ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` and the other InternVL tokens).
* InternViT-300M-448px + base LLM (``write_vision_and_llm``): the vision keys without the
  ``vision_model.`` prefix; the LLM saved by transformers' ``save_pretrained`` (Qwen2, tied
  embeddings like Qwen2-0.5B-Instruct, vocabulary padded past the tokenizer; Phi-3, padded too) or by
  hand (InternLM2: SentencePiece ``tokenizer.model``, ``model.tok_embeddings``, ``output``), with
  the base tokenizer, which has the chat tokens but no image tokens.

Every tensor is random (norms and biases included), so a swapped or dropped tensor shows.
``shards=N`` splits the tensors over N safetensors files with a ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_SIZE = {"qwen2": "tiny-qwen2", "internlm2": "tiny-internlm2", "phi3": "tiny-phi3"}
FAMILIES = tuple(TINY_SIZE)
INTERNVL2_TEMPLATE = {"qwen2": "Hermes-2", "internlm2": "internlm2-chat", "phi3": "phi3-chat"}
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
BASE_VOCAB_PADDING = 16  # base Qwen2 / Phi-3 embeddings have rows past their tokenizer


def _preset(family: str, size: str | None = None):
    from phantom_ray.model.config import PhantomConfig

    return PhantomConfig.from_preset(size or TINY_SIZE[family])


# ------------------------------------------------------------------------------------------------
# tensors
# ------------------------------------------------------------------------------------------------

def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * 0.2


def vision_state_dict(g: torch.Generator, family: str = "qwen2", size: str | None = None) -> dict[str, torch.Tensor]:
    """InternViT keys (InternViT-300M-448px: embeddings, encoder.layers.{i}.{attn.qkv, attn.proj,
    mlp.fc1, mlp.fc2, norm1, norm2, ls1, ls2}), without a prefix."""
    v = _preset(family, size).vision_config
    C, I, P = v.hidden_size, v.intermediate_size, v.patch_size
    n = (v.image_size // P) ** 2
    sd = {"embeddings.class_embedding": _rand(g, 1, 1, C),
          "embeddings.patch_embedding.weight": _rand(g, C, 3, P, P),
          "embeddings.patch_embedding.bias": _rand(g, C),
          "embeddings.position_embedding": _rand(g, 1, n + 1, C)}
    for i in range(v.num_hidden_layers):
        p = f"encoder.layers.{i}."
        sd.update({p + "attn.qkv.weight": _rand(g, 3 * C, C), p + "attn.qkv.bias": _rand(g, 3 * C),
                   p + "attn.proj.weight": _rand(g, C, C), p + "attn.proj.bias": _rand(g, C),
                   p + "mlp.fc1.weight": _rand(g, I, C), p + "mlp.fc1.bias": _rand(g, I),
                   p + "mlp.fc2.weight": _rand(g, C, I), p + "mlp.fc2.bias": _rand(g, C),
                   p + "norm1.weight": 1 + _rand(g, C), p + "norm1.bias": _rand(g, C),
                   p + "norm2.weight": 1 + _rand(g, C), p + "norm2.bias": _rand(g, C),
                   p + "ls1": 0.5 + _rand(g, C), p + "ls2": 0.5 + _rand(g, C)})
    return sd


def vision_config_dict(family: str = "qwen2", size: str | None = None) -> dict:
    """InternViT config.json fields (InternViT-300M-448px's, at the tiny shapes)."""
    v = _preset(family, size).vision_config
    return {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
            "auto_map": {"AutoConfig": "configuration_intern_vit.InternVisionConfig",
                         "AutoModel": "modeling_intern_vit.InternVisionModel"},
            "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_attention_heads": v.num_attention_heads, "num_hidden_layers": v.num_hidden_layers,
            "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": 3, "qkv_bias": True,
            "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu",
            "initializer_factor": 0.1, "initializer_range": 1e-10, "drop_path_rate": 0.0, "dropout": 0.0,
            "attention_dropout": 0.0, "use_flash_attn": True, "torch_dtype": "float32"}


def projector_state_dict(g: torch.Generator, family: str, size: str | None = None) -> dict[str, torch.Tensor]:
    """InternVL2's ``mlp1``: LayerNorm(4C) -> Linear(4C, C_llm) -> GELU -> Linear(C_llm, C_llm)."""
    cfg = _preset(family, size)
    d_in, d = 4 * cfg.vision_config.hidden_size, cfg.llm_config.hidden_size
    return {"mlp1.0.weight": 1 + _rand(g, d_in), "mlp1.0.bias": _rand(g, d_in),
            "mlp1.1.weight": _rand(g, d, d_in), "mlp1.1.bias": _rand(g, d),
            "mlp1.3.weight": _rand(g, d, d), "mlp1.3.bias": _rand(g, d)}


def hf_llm_config(family: str, vocab: int, *, tie: bool = False, size: str | None = None):
    """transformers' config for the tiny LLM of ``family`` (qwen2, phi3)."""
    from transformers import Phi3Config, Qwen2Config

    llm = _preset(family, size).llm_config
    common = dict(vocab_size=vocab, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                  num_hidden_layers=llm.num_hidden_layers, num_attention_heads=llm.num_attention_heads,
                  num_key_value_heads=llm.num_key_value_heads, rms_norm_eps=llm.rms_norm_eps,
                  max_position_embeddings=llm.max_position_embeddings, tie_word_embeddings=tie, hidden_act="silu")
    if family == "qwen2":
        return Qwen2Config(**common, rope_theta=llm.rope_theta, use_sliding_window=False, bos_token_id=0,
                           eos_token_id=2, pad_token_id=0)
    rs = llm.rope_scaling
    rope = None if not rs else {"rope_type": "longrope", "short_factor": list(rs["short_factor"]),
                                "long_factor": list(rs["long_factor"]),
                                "original_max_position_embeddings": llm.original_max_position_embeddings}
    return Phi3Config(**common, rope_theta=llm.rope_theta, sliding_window=llm.sliding_window,
                      original_max_position_embeddings=llm.original_max_position_embeddings,
                      rope_scaling=rope, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)


def _randomise(model: torch.nn.Module, g: torch.Generator) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_rand(g, *p.shape) + (1.0 if p.ndim == 1 else 0.0))
    return model.state_dict()


def hf_llm_state_dict(family: str, vocab: int, g: torch.Generator, *, tie: bool = False,
                      size: str | None = None) -> dict[str, torch.Tensor]:
    """The keys and shapes of transformers' own ``Qwen2ForCausalLM`` / ``Phi3ForCausalLM`` (built on
    the meta device), with random values."""
    from transformers import Phi3ForCausalLM, Qwen2ForCausalLM

    cls = Qwen2ForCausalLM if family == "qwen2" else Phi3ForCausalLM
    with torch.device("meta"):
        model = cls(hf_llm_config(family, vocab, tie=tie, size=size))
    sd = {k: _rand(g, *v.shape) + (1.0 if v.ndim == 1 else 0.0) for k, v in model.state_dict().items()}
    if tie:
        sd.pop("lm_head.weight", None)
    return sd


def internlm2_config_dict(vocab: int, size: str | None = None) -> dict:
    """An InternLM2 config.json (the remote-code layout of internlm2-chat-1_8b, tiny shapes)."""
    llm = _preset("internlm2", size).llm_config
    return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
            "vocab_size": vocab, "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
            "num_hidden_layers": llm.num_hidden_layers, "num_attention_heads": llm.num_attention_heads,
            "num_key_value_heads": llm.num_key_value_heads, "hidden_act": "silu",
            "max_position_embeddings": llm.max_position_embeddings, "rms_norm_eps": llm.rms_norm_eps,
            "rope_theta": llm.rope_theta, "rope_scaling": dict(llm.rope_scaling), "bias": False,
            "attn_implementation": "eager", "tie_word_embeddings": False, "initializer_range": 0.02,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32", "use_cache": True}


def internlm2_state_dict(vocab: int, g: torch.Generator, size: str | None = None) -> dict[str, torch.Tensor]:
    """InternLM2 keys by hand: ``model.tok_embeddings``, per layer ``attention.wqkv`` (packed: per
    kv group r query heads, the key head, the value head), ``attention.wo``, ``feed_forward.w1/w2/w3``,
    ``attention_norm``, ``ffn_norm``; ``model.norm``; head ``output``."""
    llm = _preset("internlm2", size).llm_config
    C, I, H, Hk = llm.hidden_size, llm.intermediate_size, llm.num_attention_heads, llm.num_key_value_heads
    D = C // H
    sd = {"model.tok_embeddings.weight": _rand(g, vocab, C), "model.norm.weight": 1 + _rand(g, C),
          "output.weight": _rand(g, vocab, C)}
    for i in range(llm.num_hidden_layers):
        p = f"model.layers.{i}."
        sd.update({p + "attention.wqkv.weight": _rand(g, (H + 2 * Hk) * D, C), p + "attention.wo.weight": _rand(g, C, H * D),
                   p + "feed_forward.w1.weight": _rand(g, I, C), p + "feed_forward.w3.weight": _rand(g, I, C),
                   p + "feed_forward.w2.weight": _rand(g, C, I),
                   p + "attention_norm.weight": 1 + _rand(g, C), p + "ffn_norm.weight": 1 + _rand(g, C)})
    return sd


def save_tensors(directory: Path, sd: dict[str, torch.Tensor], shards: int = 1, dtype: torch.dtype | None = None) -> None:
    """``model.safetensors``, or ``shards`` files plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    keys = sorted(sd)
    if shards <= 1:
        save_file({k: sd[k].contiguous() for k in keys}, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[s::shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ------------------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------------------

BASE_SPECIALS = {"qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                 "phi3": ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>",
                          "<|user|>"]}


def _bpe(specials: list[str], vocab_size: int = 300):
    """A byte-level BPE with ``specials`` at ids 0..n-1 (a stand-in for Qwen2's / Phi-3's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from phantom_ray.processing.tokenizers import _TINY_CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    end = "<|im_end|>" if "<|im_end|>" in specials else "<|end|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=end, pad_token=specials[0],
                                   clean_up_tokenization_spaces=False)


def _sentencepiece(directory: Path, added: list[str] | None = None) -> int:
    """InternLM2's tokenizer files: ``tokenizer.model`` (chat tokens as user-defined pieces),
    ``tokenizer_config.json`` and, with ``added``, ``added_tokens.json`` after the SentencePiece
    vocabulary (InternVL2's layout). Returns the number of tokens."""
    import sentencepiece as spm

    from phantom_ray.processing.tokenizers import _TINY_CORPUS

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text(_TINY_CORPUS * 3)
    prefix = directory / "sp"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=300, model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    prefix.with_suffix(".model").rename(directory / "tokenizer.model")
    prefix.with_suffix(".vocab").unlink()
    corpus.unlink()
    n = 300
    ids = {t: n + i for i, t in enumerate(added or [])}
    if ids:
        (directory / "added_tokens.json").write_text(json.dumps(ids))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
        "unk_token": "<unk>", "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in ids.items()}}))
    (directory / "tokenization_internlm2.py").write_text("# InternLM2Tokenizer (remote code; not executed here)\n")
    return n + len(ids)


# ------------------------------------------------------------------------------------------------
# the two upstream layouts
# ------------------------------------------------------------------------------------------------

def internvl2_config(family: str, llm_config: dict, size: str | None = None) -> dict:
    cfg = _preset(family, size)
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                         "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
            "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": cfg.image_size,
            "min_dynamic_patch": 1, "max_dynamic_patch": 12, "use_thumbnail": True, "ps_version": "v2",
            "select_layer": -1, "template": INTERNVL2_TEMPLATE[family], "use_backbone_lora": 0,
            "use_llm_lora": 0, "torch_dtype": "float32",
            "vision_config": vision_config_dict(family, size), "llm_config": llm_config}


def write_internvl2(directory, family: str, *, shards: int = 1, seed: int = 0, size: str | None = None,
                    dtype: torch.dtype | None = None, tokenizer=None) -> Path:
    """A tiny InternVL2 checkpoint of ``family`` (the InternVL2-1B / 2B / 4B layout) in ``directory``.
    ``size`` (another preset of the family, e.g. phantom-0.5b) and ``tokenizer`` (one with the
    InternVL tokens, saved as is) make a full-size one (bench/model_init.py)."""
    from phantom_ray.processing.tokenizers import build_tiny_tokenizer

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    if family == "internlm2" and tokenizer is None:
        vocab = _sentencepiece(d, added=INTERNVL_TOKENS)
        llm_sd, llm_cfg = internlm2_state_dict(vocab, g, size), internlm2_config_dict(vocab, size)
    elif family in FAMILIES:
        tok = tokenizer or build_tiny_tokenizer("chatml" if family == "qwen2" else "phi3")  # has the InternVL tokens
        tok.save_pretrained(d)
        vocab = len(tok)
        if family == "internlm2":
            llm_sd, llm_cfg = internlm2_state_dict(vocab, g, size), internlm2_config_dict(vocab, size)
        else:
            llm_sd = hf_llm_state_dict(family, vocab, g, size=size)
            llm_cfg = hf_llm_config(family, vocab, size=size).to_dict()
            llm_cfg.update(architectures=["Qwen2ForCausalLM" if family == "qwen2" else "Phi3ForCausalLM"],
                           attn_implementation="flash_attention_2")
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    def cast(part: dict) -> dict:  # part by part: a full-size source never exists twice in float32
        return {k: v.to(dtype) for k, v in part.items()} if dtype is not None else part

    llm_sd = cast(llm_sd)
    sd = {"vision_model." + k: v for k, v in cast(vision_state_dict(g, family, size)).items()}
    sd.update(cast(projector_state_dict(g, family, size)))
    sd.update({"language_model." + k: v for k, v in llm_sd.items()})
    save_tensors(d, sd, shards)
    (d / "config.json").write_text(json.dumps(internvl2_config(family, llm_cfg, size), indent=2))
    return d


def write_vision_and_llm(directory, family: str, *, shards: int = 1, seed: int = 0) -> tuple[Path, Path]:
    """A tiny InternViT-300M-448px directory and a tiny base LLM of ``family`` under ``directory``."""
    d = Path(directory)
    g = torch.Generator().manual_seed(seed)
    vision_dir, llm_dir = d / "InternViT-300M-448px", d / f"base-{family}"
    save_tensors(vision_dir, vision_state_dict(g, family), shards)
    (vision_dir / "config.json").write_text(json.dumps(vision_config_dict(family), indent=2))
    if family == "internlm2":
        vocab = _sentencepiece(llm_dir)
        save_tensors(llm_dir, internlm2_state_dict(vocab, g), shards)
        (llm_dir / "config.json").write_text(json.dumps(internlm2_config_dict(vocab), indent=2))
    elif family in ("qwen2", "phi3"):
        from transformers import Phi3ForCausalLM, Qwen2ForCausalLM

        tok = _bpe(BASE_SPECIALS[family])
        vocab = len(tok) + BASE_VOCAB_PADDING
        tie = family == "qwen2"  # Qwen2-0.5B-Instruct ties its head to the embedding
        cls = Qwen2ForCausalLM if family == "qwen2" else Phi3ForCausalLM
        model = cls(hf_llm_config(family, vocab, tie=tie))
        _randomise(model, g)
        model.save_pretrained(llm_dir, max_shard_size="20KB" if shards > 1 else "5GB")
        tok.save_pretrained(llm_dir)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return vision_dir, llm_dir
