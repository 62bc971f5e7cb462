"""Tokenizers: the one shipped with a checkpoint, or a tiny one trained locally for tests.

* Qwen2 checkpoints ship ``tokenizer.json``: loaded with transformers (no remote code).
* InternLM2 checkpoints ship only a SentencePiece ``tokenizer.model`` plus ``added_tokens.json``, and
  transformers has no InternLM2 tokenizer class: :class:`SentencePieceTokenizer` wraps the model the
  way the reference's ``InternLM2Tokenizer`` does (split on added tokens, SentencePiece on the rest).
  Phi-3 directories without a ``tokenizer.json`` take the same path.
* ``tiny-*`` presets get :func:`build_tiny_tokenizer`: a byte-level BPE trained in a few
  milliseconds with the ``tokenizers`` library on an embedded corpus, carrying the family's special
  tokens at ids 0..n-1 (``TINY_SPECIAL_TOKENS``), so nothing is downloaded.

Every loader checks that ``<IMG_CONTEXT>`` is one token whose id is ``config.image_token_index``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from phantom_ray.model.config import TINY_SPECIAL_TOKENS, PhantomConfig
from phantom_ray.model.loading import cache_root, is_hub_id  # one cache root, one hub-id guess

TINY_VOCAB_SIZE = 384
END_TOKENS = {"chatml": "<|im_end|>", "phi3": "<|end|>"}

# Small English corpus for the tiny tokenizers: the caption/VQA words the tiny training and
# captioning tests use (colours, shapes, counts, positions) plus the chat-template words.
_TINY_CORPUS = """\
The image shows a red circle. The image shows a green square. The image shows a blue triangle.
There is one yellow star on a white background. There are two black squares and three red circles.
A small orange circle is left of a large purple square. The big green triangle is above the blue line.
What color is the circle? The circle is red. What shape is it? It is a square. How many shapes are there?
There are four shapes: one circle, one square, one triangle and one star. Five dots, six lines.
Seven, eight, nine, ten. Zero shapes. The left half is blue and the right half is yellow.
Describe the image in detail. The picture contains a grey rectangle at the top and a pink oval at the bottom.
Answer the question using a single word or phrase. Yes. No. Red. Green. Blue. Yellow. White. Black.
user assistant system question answer image picture photo color colour shape number count left right top
bottom center middle above below next to inside outside small large big tiny bright dark light
A cat sits on a mat. A dog runs in the park. The sky is blue and the grass is green.
This is a photo of a brown horse standing in a field under a cloudy sky.
You are a helpful assistant. Please answer briefly. The answer is correct. The answer is wrong.
circle circles square squares triangle triangles star stars line lines dot dots rectangle oval
one two three four five six seven eight nine ten red green blue yellow orange purple pink brown grey gray
0 1 2 3 4 5 6 7 8 9 10 100 , . ? ! : ; ' " ( ) - the a an of in on at is are and with to it
"""
_TINY_WORDS = ("red green blue yellow orange purple pink brown white black grey circle square triangle star "
               "line dot one two three four five six seven eight nine ten left right top bottom image color "
               "shape how many what is there are the")


# ------------------------------------------------------------------------------------------------
# Tiny tokenizers
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tiny_tokenizer_json(template: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = TINY_SPECIAL_TOKENS[template]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # the key words count 8x more, so colour/shape/number words become whole tokens
    tok.train_from_iterator(_TINY_CORPUS.splitlines() + [_TINY_WORDS] * 8, trainer=trainer)
    for i, t in enumerate(specials):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"tiny tokenizer: special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
    if tok.get_vocab_size() > TINY_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer vocab {tok.get_vocab_size()} > {TINY_VOCAB_SIZE}")
    return tok.to_str()


def build_tiny_tokenizer(template: str):
    """Deterministic byte-level BPE (vocab <= 384) with ``TINY_SPECIAL_TOKENS[template]`` at ids
    0..n-1; pad = eos = the assistant end token. Returns a fresh ``PreTrainedTokenizerFast``."""
    if template not in TINY_SPECIAL_TOKENS:
        raise ValueError(f"unknown template {template!r}; expected one of {sorted(TINY_SPECIAL_TOKENS)}")
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    end = END_TOKENS[template]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(template)),
        eos_token=end,
        pad_token=end,
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tok


# ------------------------------------------------------------------------------------------------
# SentencePiece (InternLM2, Phi-3 without tokenizer.json)
# ------------------------------------------------------------------------------------------------

class SentencePieceTokenizer:
    """Minimal tokenizer over a SentencePiece model with added tokens (the reference's
    ``InternLM2Tokenizer`` behaviour with ``add_special_tokens=False``): text is split on added and
    control tokens, and each piece in between is encoded with SentencePiece.

    Offers the subset of the transformers tokenizer interface the processor and the generation
    code use: ``encode``, ``__call__``, ``decode``, ``batch_decode``, ``convert_tokens_to_ids``,
    ``convert_ids_to_tokens``, ``pad_token_id``, ``eos_token_id``, ``all_special_ids``, ``len``.
    """

    def __init__(self, model_file: str | os.PathLike | None, added_tokens: dict[str, int] | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, padding_side: str = "left",
                 proto: bytes | None = None, init_config: dict | None = None):
        import sentencepiece as spm

        self._proto = proto if proto is not None else Path(model_file).read_bytes()
        # the checkpoint's tokenizer_config.json, written back (updated) by save_pretrained
        self.init_config = dict(init_config or {})
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.added_tokens = dict(added_tokens or {})
        self.padding_side = padding_side
        n = self.sp.get_piece_size()
        # control / user-defined pieces inside the model (e.g. <|im_start|> in InternLM2's model)
        self._special_pieces = {
            self.sp.id_to_piece(i): i for i in range(n)
            if self.sp.is_control(i) or self.sp.is_unknown(i) or self._is_user_defined(i)
        }
        self._special = {**self._special_pieces, **self.added_tokens}
        self._id_to_added = {v: k for k, v in self.added_tokens.items()}
        # text is split on every special string except unk/bos/eos (the reference never sees those
        # in prompts and "<s>" could legitimately occur in text)
        skip = {self.sp.id_to_piece(i) for i in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) if 0 <= i < n}
        splittable = sorted((t for t in self._special if t and t not in skip), key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in splittable) + ")") if splittable else None
        self.eos_token = eos_token
        self.pad_token = pad_token or eos_token
        self.unk_token_id = self.sp.unk_id()

    _SPECIAL_LIKE = re.compile(r"^<[^<>\s]+>$")

    def _is_user_defined(self, i: int) -> bool:
        # sentencepiece's Python API cannot tell user-defined pieces (InternLM2's <|im_start|>) apart;
        # such a piece looks like <...> and always encodes to itself, in any context
        if self.sp.is_byte(i):
            return False
        piece = self.sp.id_to_piece(i)
        return bool(self._SPECIAL_LIKE.match(piece)) and self.sp.encode("a" + piece)[-1:] == [i]

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("sp")
        return d

    def __setstate__(self, d):
        import sentencepiece as spm

        self.__dict__.update(d)
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)

    def __len__(self) -> int:
        return max(self.sp.get_piece_size(), max(self.added_tokens.values(), default=-1) + 1)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            if tokens in self._special:
                return self._special[tokens]
            return self.sp.piece_to_id(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._id_to_added.get(ids) or self.sp.id_to_piece(ids)
        return [self.convert_ids_to_tokens(i) for i in ids]

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.convert_tokens_to_ids(self.pad_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.convert_tokens_to_ids(self.eos_token)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(set(self._special.values()))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if add_special_tokens:
            raise NotImplementedError("Phantom prompts never add BOS/EOS (docs/phantom.md#prompts)")
        parts = self._split_re.split(text) if self._split_re is not None else [text]
        ids: list[int] = []
        for part in parts:
            if not part:
                continue
            if part in self._special:
                ids.append(self._special[part])
            else:
                ids.extend(self.sp.encode(part))
        return ids

    def __call__(self, text, add_special_tokens: bool = False, **_: Any) -> dict:
        if isinstance(text, str):
            return {"input_ids": self.encode(text)}
        return {"input_ids": [self.encode(t) for t in text]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        special = set(self._special.values())
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in special or i in self._id_to_added:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.convert_ids_to_tokens(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def batch_decode(self, seqs, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in seqs]

    def add_tokens(self, tokens: list[str]) -> int:
        """Append tokens after the current vocabulary (ids ``len(self)``, ...), skipping those it
        already has; returns how many were added (``transformers``' ``add_tokens`` contract)."""
        n = 0
        for t in tokens:
            if t in self._special or self.sp.piece_to_id(t) != self.sp.unk_id():
                continue
            self.added_tokens[t] = len(self)
            n += 1
        if n:
            self.__init__(model_file=None, added_tokens=self.added_tokens, eos_token=self.eos_token,
                          pad_token=self.pad_token, padding_side=self.padding_side, proto=self._proto,
                          init_config=self.init_config)
        return n

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write ``tokenizer.model``, ``added_tokens.json``, ``tokenizer_config.json`` and
        ``special_tokens_map.json`` (the layout InternLM2 checkpoints ship, which
        :func:`load_tokenizer` reads back); returns the file names written."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.model").write_bytes(self._proto)
        (d / "added_tokens.json").write_text(json.dumps(self.added_tokens, indent=2, ensure_ascii=False))
        cfg = dict(self.init_config)
        decoder = dict(cfg.get("added_tokens_decoder") or {})
        for tok, tid in self.added_tokens.items():
            decoder.setdefault(str(tid), {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True})
        cfg.update(added_tokens_decoder=decoder, eos_token=self.eos_token, pad_token=self.pad_token,
                   padding_side=self.padding_side)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        (d / "special_tokens_map.json").write_text(json.dumps(
            {k: v for k, v in (("eos_token", self.eos_token), ("pad_token", self.pad_token)) if v is not None}, indent=2))
        return ["tokenizer.model", "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"]


def _sentencepiece_from_dir(d: Path, template_end: str | None) -> SentencePieceTokenizer:
    added: dict[str, int] = {}
    if (d / "added_tokens.json").exists():
        added.update({k: int(v) for k, v in json.loads((d / "added_tokens.json").read_text()).items()})
    eos = pad = None
    cfg: dict = {}
    cfg_path = d / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        for tid, spec in (cfg.get("added_tokens_decoder") or {}).items():
            content = spec.get("content") if isinstance(spec, dict) else None
            if content:
                added.setdefault(content, int(tid))
        eos = _token_str(cfg.get("eos_token"))
        pad = _token_str(cfg.get("pad_token"))
    return SentencePieceTokenizer(d / "tokenizer.model", added, eos_token=template_end or eos,
                                  pad_token=pad or template_end or eos, init_config=cfg)


def _token_str(t) -> str | None:
    if isinstance(t, dict):
        return t.get("content")
    return t


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "added_tokens.json",
                    "special_tokens_map.json", "vocab.json", "merges.txt", "config.json", "chat_template.jinja")


def _download_hub(repo_id: str) -> Path:
    """Only the tokenizer files of a hub repository (where the network allows)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(_TOKENIZER_FILES),
                                      cache_dir=str(cache_root() / "hub")))
    except Exception as exc:  # noqa: BLE001 - network errors come in many types; say what was tried
        raise FileNotFoundError(f"tokenizer {repo_id!r}: not a preset or directory, and the hub "
                                f"download failed (no network?): {exc}") from exc


def _download_s3_dir(uri: str) -> Path:
    """Fetch only the tokenizer files under an s3:// checkpoint prefix (not the weights) into the
    local cache (``$PHANTOM_RAY_CACHE`` or ~/.cache/phantom_ray); each file lands atomically."""
    from phantom_ray.storage import s3_client, split_s3

    bucket, prefix = split_s3(uri)
    dest = cache_root() / "tokenizers" / bucket / (prefix or "_root")
    s3 = s3_client()
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=(prefix + "/") if prefix else ""):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1:] if prefix else obj["Key"]
            if rel in _TOKENIZER_FILES:
                found.append((obj["Key"], rel))
    if not found:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}) under {uri}")
    dest.mkdir(parents=True, exist_ok=True)
    for key, rel in found:
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{rel}.")
        os.close(fd)
        s3.download_file(bucket, key, tmp)
        os.replace(tmp, dest / rel)  # concurrent actors never read half a file
    return dest


def load_tokenizer(path_or_preset: str, config: PhantomConfig | None = None):
    """Tokenizer for a preset (``tiny-*``), a checkpoint directory, an ``s3://`` prefix or a hub id.

    With a ``config`` (or a ``config.json`` next to the tokenizer), checks that ``<IMG_CONTEXT>``
    maps to ``config.image_token_index`` and raises ``ValueError`` naming both ids otherwise."""
    src = str(path_or_preset)
    template = config.template if config is not None else None
    if src.startswith("tiny-"):
        if config is None:
            config = PhantomConfig.from_preset(src)
        tok = build_tiny_tokenizer(config.template)
    else:
        d = _download_s3_dir(src) if src.startswith("s3://") else Path(src).expanduser()
        if is_hub_id(src):
            d = _download_hub(src)
        if not d.is_dir():
            raise FileNotFoundError(
                f"tokenizer source {src!r} is neither a tiny-* preset nor a directory with tokenizer files"
            )
        if config is None and (d / "config.json").exists():
            raw = json.loads((d / "config.json").read_text())
            if "llm_config" in raw:
                config = PhantomConfig.from_dict(raw)
        template = config.template if config is not None else template
        if (d / "tokenizer.json").exists():
            tok = _load_fast(d)
        elif (d / "tokenizer.model").exists():
            tok = _sentencepiece_from_dir(d, END_TOKENS.get(template) if template else None)
        else:
            raise FileNotFoundError(f"{src}: no tokenizer.json or tokenizer.model found")
    if config is not None:
        check_image_token(tok, config, where=src)
    return tok


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def tokenizer_files(tokenizer, config: PhantomConfig) -> dict[str, bytes]:
    """The files that go next to a model's weights: the tokenizer's own files plus Phantom's chat
    template for ``config.template`` (``chat_template.jinja`` and the ``chat_template`` field of
    ``tokenizer_config.json``, see :mod:`phantom_ray.processing.chat_template`), and a
    ``generation_config.json`` naming the processor's stop tokens as ``eos_token_id``.

    The one way a tokenizer is saved with a model: the training export, ``model init`` and a
    preset's materialised directory all pass these to ``save_pretrained(..., extra_files=...)``, so
    every export builds Phantom's prompt in ``apply_chat_template``, ``vllm serve`` and Ray's LLM APIs."""
    from phantom_ray.processing.chat_template import chat_template

    check_image_token(tokenizer, config)
    template = chat_template(config.template)
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        files = {name: (Path(d) / name).read_bytes() for name in os.listdir(d) if (Path(d) / name).is_file()}
    cfg = json.loads(files.get("tokenizer_config.json", b"{}"))
    cfg["chat_template"] = template  # readers that predate chat_template.jinja
    files["tokenizer_config.json"] = (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode()
    files[CHAT_TEMPLATE_FILE] = template.encode()
    # the processor's stop tokens (config eos + the template's end token), where vLLM and
    # transformers read a model's end-of-sequence ids: stock entry points stop where our engines do
    stops = [int(t) for t in config.stop_token_ids if t is not None]
    end = tokenizer.convert_tokens_to_ids(END_TOKENS[config.template])
    if end is not None and end not in stops:
        stops.append(int(end))
    gen = {"eos_token_id": stops if len(stops) > 1 else stops[0]} if stops else {}
    if getattr(tokenizer, "pad_token_id", None) is not None:
        gen["pad_token_id"] = int(tokenizer.pad_token_id)
    files["generation_config.json"] = (json.dumps(gen, indent=2) + "\n").encode()
    return files


def save_tokenizer(tokenizer, config: PhantomConfig, directory: str | os.PathLike) -> None:
    """Write :func:`tokenizer_files` into a local directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer_files(tokenizer, config).items():
        (d / name).write_bytes(data)


@functools.cache
def _register_phantom_config() -> None:
    """Tell transformers' AutoConfig that ``model_type: phantom`` (our config.json) exists.

    AutoTokenizer reads the checkpoint's config.json to pick a tokenizer class; an unknown model type
    made it fall back to the base config class (model type ``""``) and warn "You are using a model of
    type `phantom` to instantiate a model of type ``" on every load. A config class that carries our
    model type is the cause's fix; the tokenizer class still comes from tokenizer_config.json."""
    from transformers import AutoConfig, PretrainedConfig

    class PhantomHFConfig(PretrainedConfig):
        model_type = "phantom"

    AutoConfig.register("phantom", PhantomHFConfig, exist_ok=True)


def _load_fast(d: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _register_phantom_config()
    try:
        tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False, padding_side="left")
    except (ValueError, OSError, KeyError, ImportError):
        # tokenizer_config.json names a class this transformers lacks (remote code): the
        # tokenizer.json alone is enough for encoding and decoding.
        tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), padding_side="left")
    return tok


def check_image_token(tok, config: PhantomConfig, where: str = "tokenizer") -> None:
    got = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    unk = getattr(tok, "unk_token_id", None)
    if got is None or (unk is not None and got == unk):
        raise ValueError(f"{where}: tokenizer has no <IMG_CONTEXT> token (config.image_token_index={config.image_token_index})")
    if got != config.image_token_index:
        raise ValueError(
            f"{where}: tokenizer maps <IMG_CONTEXT> to id {got} but config.image_token_index is "
            f"{config.image_token_index}; the tokenizer and the checkpoint do not belong together"
        )


# ------------------------------------------------------------------------------------------------
# Tokenizers next to a model: the files an export carries, the tokens Phantom needs
# ------------------------------------------------------------------------------------------------

# InternVL2's added tokens, in InternVL2's order: appended to a base LLM's tokenizer they land at the
# ids InternVL2 (and so Phantom) uses (docs/checkpoints.md#tokenizer).
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")


def has_token(tok, token: str) -> bool:
    tid = tok.convert_tokens_to_ids(token)
    unk = getattr(tok, "unk_token_id", None)
    return tid is not None and not (unk is not None and tid == unk and token != getattr(tok, "unk_token", None))


def add_phantom_tokens(tok, template: str) -> list[str]:
    """Add what the processor needs and ``tok`` lacks; returns the tokens added, in id order (empty
    for an InternVL2 tokenizer, which has them all). A tokenizer without the image tokens (a base
    LLM's) gets all of InternVL2's added tokens, in InternVL2's order, so they land at InternVL2's
    ids; then any chat-template role token it lacks."""
    from phantom_ray.processing.processor import IMG_CONTEXT, IMG_END, IMG_START, ROLE_TOKENS

    needed = list(ROLE_TOKENS[template])
    if not all(has_token(tok, t) for t in (IMG_START, IMG_END, IMG_CONTEXT)):
        needed = [*INTERNVL_TOKENS, *needed]
    missing = [t for t in needed if not has_token(tok, t)]
    if not missing:
        return []
    if isinstance(tok, SentencePieceTokenizer):
        tok.add_tokens(missing)
    else:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return missing


def load_checkpoint_tokenizer(directory: str | os.PathLike, template: str):
    """The tokenizer shipped in an upstream checkpoint directory (an InternVL2 checkpoint or a base
    LLM), without the Phantom config checks of :func:`load_tokenizer` (the directory's config.json
    is not a Phantom config): ``tokenizer.json`` / ``vocab.json`` + ``merges.txt`` through
    transformers, else ``tokenizer.model`` through :class:`SentencePieceTokenizer`."""
    d = Path(directory)
    if (d / "tokenizer.json").exists() or (d / "vocab.json").exists():
        import shutil

        from transformers import AutoTokenizer

        # the tokenizer files alone: the directory's config.json (an InternVL2 or LLM config) would
        # make AutoTokenizer guess a model type it does not need
        with tempfile.TemporaryDirectory() as tmp:
            for name in _TOKENIZER_FILES:
                if name != "config.json" and (d / name).exists():
                    shutil.copy(d / name, Path(tmp) / name)
            try:
                return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False, padding_side="left")
            except (ValueError, OSError, KeyError, ImportError, TypeError):
                if (d / "tokenizer.json").exists():
                    return _load_fast(Path(tmp))
                raise
    if (d / "tokenizer.model").exists():
        return _sentencepiece_from_dir(d, END_TOKENS[template])
    raise FileNotFoundError(f"{d}: no tokenizer (tokenizer.json, vocab.json + merges.txt or tokenizer.model)")

