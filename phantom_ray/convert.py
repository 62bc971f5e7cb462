"""Starting weights from public checkpoints: ``phantom-ray model init`` (docs/checkpoints.md).

Phantom's step 1 starts from InternVL2-style weights (docs/phantom.md#phantom-optimization): an InternViT-300M
vision tower, the ``mlp1`` projector and an LLM of the size's family, with the phantom modules added
fresh. Two upstream routes lead there:

* ``source``: one InternVL2 checkpoint (InternVL2-1B / 2B / 4B / 8B for phantom-0.5b / 1.8b / 3.8b /
  7b) holding ``vision_model.*``, ``mlp1.*`` and ``language_model.*``; every tensor keeps its key
  except ``mlp1.*`` -> ``vision_proj.*``;
* ``vision`` + ``llm``: an InternViT-300M-448px checkpoint (keys ``embeddings.*``, ``encoder.*`` ->
  ``vision_model.*``) and a base LLM in its Hugging Face layout (Qwen2, InternLM2, Phi-3; keys ->
  ``language_model.*``), with a freshly initialised projector.

The tokenizer comes from the source (the LLM's in the second route), with the tokens the processor
needs added (InternVL2's image tokens in InternVL2's order, so they land at InternVL2's ids); the
embedding and head rows of added tokens start at the mean of the existing rows. Sizes are checked
against the ``size`` preset field by field; a mismatch is one line naming the field. Tensors are read
one at a time from the (sharded) safetensors files and the result is written by the same function
the training export uses (``save_pretrained`` with the files of ``tokenizer_files``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phantom_ray.config import ConfigError
from phantom_ray.model.config import InternVisionConfig, LLMConfig, PhantomConfig, list_presets

logger = logging.getLogger(__name__)

# The public checkpoints each size starts from (docs/checkpoints.md#sources).
INTERNVL2_FOR_SIZE = {
    "phantom-0.5b": "OpenGVLab/InternVL2-1B",
    "phantom-1.8b": "OpenGVLab/InternVL2-2B",
    "phantom-3.8b": "OpenGVLab/InternVL2-4B",
    "phantom-7b": "OpenGVLab/InternVL2-8B",
}
BASE_LLM_FOR_SIZE = {
    "phantom-0.5b": "Qwen/Qwen2-0.5B-Instruct",
    "phantom-1.8b": "internlm/internlm2-chat-1_8b",
    "phantom-3.8b": "microsoft/Phi-3-mini-128k-instruct",
    "phantom-7b": "internlm/internlm2_5-7b-chat",
}
VISION_SOURCE = "OpenGVLab/InternViT-300M-448px"

# Fields that make a size: they must equal the preset's. Everything else (vocabulary, RoPE settings,
# token ids, context length) is data of the source and taken from it.
LLM_SIZE_FIELDS = ("family", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads")
VISION_SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "patch_size", "image_size", "norm_type", "qkv_bias", "qk_normalization")
# bookkeeping keys of upstream configs that mean nothing to our model (code pointers, dtype, versions)
_NOISE_KEYS = ("auto_map", "_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype",
               "attn_implementation", "_attn_implementation", "_attn_implementation_autoset", "architectures",
               "model_type", "use_flash_attn", "use_cache", "output_attentions", "output_hidden_states",
               "return_dict", "tokenizer_class")
# source keys that are computed buffers, not weights (older checkpoints saved them)
_IGNORED_SOURCE_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# remote-code tokenizer files carried over next to the tokenizer (for users of trust_remote_code)
_TOKENIZER_CODE = re.compile(r"^tokenization_.*\.py$")


class SizeMismatchError(ConfigError):
    """An upstream checkpoint whose shape does not match the requested size (one line, names the field)."""


# ------------------------------------------------------------------------------------------------
# Reading upstream checkpoints lazily
# ------------------------------------------------------------------------------------------------

class TensorSource:
    """The tensors of a checkpoint directory, read one at a time: ``model.safetensors``, sharded
    safetensors with ``model.safetensors.index.json``, or (fallback) ``pytorch_model*.bin``."""

    def __init__(self, directory: str | Path, name: str):
        self.directory = Path(directory)
        self.name = name
        d = self.directory
        self._files: dict[str, str] = {}
        self._handles: dict[str, object] = {}
        if (d / "model.safetensors.index.json").exists():
            self._files = dict(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"])
        elif (d / "model.safetensors").exists():
            self._files = {k: "model.safetensors" for k in self._keys_of("model.safetensors")}
        elif (d / "pytorch_model.bin.index.json").exists():
            self._files = dict(json.loads((d / "pytorch_model.bin.index.json").read_text())["weight_map"])
        elif (d / "pytorch_model.bin").exists():
            self._files = {k: "pytorch_model.bin" for k in self._open("pytorch_model.bin").keys()}
        else:
            raise FileNotFoundError(f"{name} ({d}): no model.safetensors, model.safetensors.index.json or "
                                    "pytorch_model.bin: not a checkpoint directory")

    def _keys_of(self, fname: str) -> list[str]:
        return list(self._open(fname).keys())

    def _open(self, fname: str):
        if fname not in self._handles:
            path = str(self.directory / fname)
            if fname.endswith(".safetensors"):
                from safetensors import safe_open

                self._handles[fname] = safe_open(path, framework="pt", device="cpu")
            else:  # memory-mapped: a .bin is not read whole either
                self._handles[fname] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._handles[fname]

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        h = self._open(self._files[key])
        return tuple(h.get_slice(key).get_shape()) if hasattr(h, "get_slice") else tuple(h[key].shape)

    def get(self, key: str) -> torch.Tensor:
        h = self._open(self._files[key])
        return h.get_tensor(key) if hasattr(h, "get_tensor") else h[key]

    def close(self) -> None:
        self._handles.clear()


def read_config(directory: Path, name: str) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{name} ({directory}) has no config.json")
    return json.loads(path.read_text())


def resolve_source(uri: str, what: str) -> Path:
    """A local directory for a local path, an ``s3://`` prefix (downloaded once into the cache) or
    a hub id (where the network allows); errors name the flag."""
    from phantom_ray.model.loading import resolve_checkpoint

    try:
        return resolve_checkpoint(str(uri))
    except (FileNotFoundError, NotADirectoryError, OSError) as exc:
        raise FileNotFoundError(f"--{what} {uri}: {exc}") from exc


# ------------------------------------------------------------------------------------------------
# Config of the result: the preset, with the source's data fields
# ------------------------------------------------------------------------------------------------

def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in _NOISE_KEYS}


def _mismatch(size: str, where: str, fld: str, got, want) -> SizeMismatchError:
    hint = ""
    if size in INTERNVL2_FOR_SIZE:
        hint = (f" ({size} starts from {INTERNVL2_FOR_SIZE[size]}, or {VISION_SOURCE} + "
                f"{BASE_LLM_FOR_SIZE[size]})")
    return SizeMismatchError(f"{where}: {fld} is {got!r} but --size {size} needs {want!r}{hint}")


def check_llm(size: str, preset: PhantomConfig, llm: LLMConfig, where: str) -> None:
    for f in LLM_SIZE_FIELDS:
        got, want = getattr(llm, f), getattr(preset.llm_config, f)
        if got != want:
            name = "llm_config.architectures (family)" if f == "family" else f"llm_config.{f}"
            raise _mismatch(size, where, name, got, want)


def check_vision(size: str, preset: PhantomConfig, vision: InternVisionConfig, image_size: int, where: str) -> None:
    for f in VISION_SIZE_FIELDS:
        got = image_size if f == "image_size" else getattr(vision, f)
        want = preset.image_size if f == "image_size" else getattr(preset.vision_config, f)
        if got != want:
            raise _mismatch(size, where, f"vision_config.{f}", got, want)


def check_internvl_fields(size: str, raw: dict, where: str) -> None:
    """InternVL2 top-level fields our model implements one way only (docs/checkpoints.md#internvl2)."""
    checks = (("downsample_ratio", 0.5), ("ps_version", "v2"), ("select_layer", -1))
    for f, want in checks:
        if f in raw and raw[f] != want:
            raise SizeMismatchError(f"{where}: {f} is {raw[f]!r}; Phantom's vision path needs {want!r}")


def llm_config_from(raw: dict, where: str) -> LLMConfig:
    d = _clean(dict(raw))
    d["architectures"] = raw.get("architectures")
    d["model_type"] = raw.get("model_type", "")
    try:
        return LLMConfig.from_dict(d)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def vision_config_from(raw: dict, where: str) -> InternVisionConfig:
    try:
        return InternVisionConfig.from_dict(_clean(dict(raw)))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


# ------------------------------------------------------------------------------------------------
# The conversion
# ------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """Where every target tensor comes from: ``copied[target] = (source name, source key)``;
    ``fresh`` are initialised here; ``vocab_keys`` (embedding, head) are row-mapped (added tokens
    start at the mean row); ``head_from_embedding``: an untied head copied from a tied source."""

    copied: dict[str, tuple[str, str]] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    vocab_keys: tuple[str, ...] = ()
    head_from_embedding: bool = False


@dataclass
class InitResult:
    output: str
    config: PhantomConfig
    plan: Plan
    added_tokens: list[str]
    vocab_size: int
    source_vocab_rows: int
    counts: dict[str, int]


def fresh_key(key: str, has_projector: bool) -> bool:
    """The documented fresh-init set (docs/checkpoints.md#fresh): phantom modules always, the
    projector when the source has none."""
    return "_phantom" in key or (not has_projector and key.startswith("vision_proj."))


def build_plan(target_keys: list[str], sources: dict[str, TensorSource], route: str, embed_key: str,
               head_key: str, tied_target: bool) -> Plan:
    """Map target keys to source keys by the naming rule of the route; strict both ways (every source
    tensor used, every target tensor found or fresh)."""
    plan = Plan(vocab_keys=(embed_key,) if tied_target else (embed_key, head_key))
    if route == "internvl2":
        src = sources["source"]
        src_keys = set(src.keys())
        has_projector = any(k.startswith(("mlp1.", "vision_proj.")) for k in src_keys)

        def where(t: str) -> tuple[str, str] | None:
            if t.startswith("vision_proj."):
                for k in ("mlp1." + t[len("vision_proj."):], t):
                    if k in src_keys:
                        return "source", k
                return None
            return ("source", t) if t in src_keys else None
    else:
        vis, llm = set(sources["vision"].keys()), set(sources["llm"].keys())
        has_projector = False

        def where(t: str) -> tuple[str, str] | None:
            if t.startswith("vision_model."):
                k = t[len("vision_model."):]
                return ("vision", k) if k in vis else None
            if t.startswith("language_model."):
                k = t[len("language_model."):]
                return ("llm", k) if k in llm else None
            return None
    missing = []
    for t in target_keys:
        if fresh_key(t, has_projector):
            plan.fresh.append(t)
            continue
        hit = where(t)
        if hit is None and t == head_key:
            plan.head_from_embedding = True  # tied source (Qwen2-0.5B): the head starts as the embedding
            hit = where(embed_key)
        if hit is None:
            missing.append(t)
            continue
        plan.copied[t] = hit
    used = {(s, k) for s, k in plan.copied.values()}
    unused = sorted(f"{s}:{k}" for s, src in sources.items() for k in src.keys()
                    if (s, k) not in used and not _IGNORED_SOURCE_KEY.search(k))
    if missing or unused:
        def show(ks):
            return ", ".join(ks[:12]) + (f", ... ({len(ks)} in all)" if len(ks) > 12 else "")

        parts = []
        if missing:
            parts.append(f"not in the source: {show(missing)}")
        if unused:
            parts.append(f"source tensors with no place in the model: {show(unused)}")
        raise ConfigError("the upstream checkpoint does not match the Phantom layout (docs/checkpoints.md): "
                          + "; ".join(parts))
    return plan


def _init_fresh(key: str, shape: torch.Size, std: float, g: torch.Generator) -> torch.Tensor:
    """HF-style init of the fresh tensors (docs/checkpoints.md#fresh): linears N(0, std), biases 0,
    LayerNorm weight 1. The phantom branch is then a near-identity (docs/phantom.md#near-identity)."""
    if key.endswith(".bias"):
        return torch.zeros(shape)
    if key.startswith("vision_proj.0."):  # LayerNorm
        return torch.ones(shape)
    return torch.empty(shape).normal_(0.0, std, generator=g)


def _vocab_rows(t: torch.Tensor, vocab: int, n_tokens: int, added_ids: list[int]) -> torch.Tensor:
    """Embedding / head rows for a vocabulary of ``vocab``: source rows kept where they exist, except
    the rows of added tokens, which (like any row the source lacks) start at the mean of the rows of
    the ``n_tokens`` tokens the source tokenizer had; source rows beyond ``vocab`` (padding of the
    source's vocabulary past its tokenizer) are dropped."""
    out = torch.empty((vocab, *t.shape[1:]), dtype=t.dtype)
    n = min(vocab, t.shape[0])
    out[:n] = t[:n]
    mean = t[:n_tokens].float().mean(0).to(t.dtype)
    out[n:] = mean
    for i in added_ids:
        out[i] = mean
    return out


def init_checkpoint(size: str, output: str, source: str | None = None, vision: str | None = None,
                    llm: str | None = None, seed: int = 0, dtype: str = "source", overwrite: bool = False,
                    max_shard_bytes: int = 4 * 1024**3) -> InitResult:
    """Write a step-1 starting checkpoint for ``size`` to ``output`` (dir or ``s3://``); see the module docstring."""
    from phantom_ray import storage
    from phantom_ray.model.modeling import PhantomForCausalLM
    from phantom_ray.processing.processor import PhantomProcessor
    from phantom_ray.processing.tokenizers import (
        add_phantom_tokens,
        check_image_token,
        load_checkpoint_tokenizer,
        tokenizer_files,
    )

    if size not in list_presets():
        raise ConfigError(f"--size {size!r} is not a preset; available: {', '.join(list_presets())}")
    if (source is None) == (vision is None and llm is None):
        raise ConfigError("give --source (an InternVL2 checkpoint) or --vision and --llm, not both and not neither")
    if source is None and (vision is None or llm is None):
        raise ConfigError("--vision and --llm go together (InternViT-300M-448px + the base LLM)")
    if dtype not in ("source", "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {dtype!r}: use source, float32, bfloat16 or float16")
    out_cfg = storage.join(output, "config.json")
    if not overwrite and storage.exists(out_cfg):
        raise ConfigError(f"--output {output} already holds a checkpoint (config.json); pass --overwrite to replace it")
    preset = PhantomConfig.from_preset(size)

    # ---- sources and configs ---------------------------------------------------------------------
    if source is not None:
        route = "internvl2"
        src_dir = resolve_source(source, "source")
        raw = read_config(src_dir, f"--source {source}")
        where = f"--source {source}"
        if "llm_config" not in raw or "vision_config" not in raw:
            raise ConfigError(f"{where}: config.json has no llm_config/vision_config: not an InternVL2 checkpoint "
                              "(for a base LLM use --vision and --llm)")
        check_internvl_fields(size, raw, where)
        llm_cfg = llm_config_from(raw["llm_config"], where)
        vis_cfg = vision_config_from(raw["vision_config"], where)
        force_image_size = raw.get("force_image_size")
        sources = {"source": TensorSource(src_dir, where)}
        tok_dir = src_dir
    else:
        route = "vision+llm"
        vis_dir, llm_dir = resolve_source(vision, "vision"), resolve_source(llm, "llm")
        vraw = read_config(vis_dir, f"--vision {vision}")
        if "vision_config" in vraw or "llm_config" in vraw:
            raise ConfigError(f"--vision {vision}: this is a composite (InternVL2) checkpoint; pass it as --source")
        llm_cfg = llm_config_from(read_config(llm_dir, f"--llm {llm}"), f"--llm {llm}")
        vis_cfg = vision_config_from(vraw, f"--vision {vision}")
        force_image_size = None
        sources = {"vision": TensorSource(vis_dir, f"--vision {vision}"), "llm": TensorSource(llm_dir, f"--llm {llm}")}
        tok_dir = llm_dir
        where = f"--llm {llm}"
    check_llm(size, preset, llm_cfg, where)
    check_vision(size, preset, vis_cfg, force_image_size or vis_cfg.image_size,
                 where if route == "internvl2" else f"--vision {vision}")

    # ---- tokenizer -------------------------------------------------------------------------------
    tok = load_checkpoint_tokenizer(tok_dir, preset.template)
    n_before = len(tok)
    added = add_phantom_tokens(tok, preset.template)
    added_ids = [int(tok.convert_tokens_to_ids(t)) for t in added]
    embed_name = "language_model.model." + ("tok_embeddings" if llm_cfg.family == "internlm2" else "embed_tokens") + ".weight"
    head_name = "language_model." + ("output" if llm_cfg.family == "internlm2" else "lm_head") + ".weight"
    src_llm = sources["source" if route == "internvl2" else "llm"]
    src_embed_key = (embed_name if route == "internvl2" else embed_name[len("language_model."):])
    src_rows = int(src_llm.shape(src_embed_key)[0])
    n_tokens = max(len(tok), max(added_ids, default=-1) + 1)
    # InternVL2 sized its vocabulary for its tokenizer: kept. A base LLM's is cut (or grown) to its
    # tokenizer plus the added tokens, as InternVL2 did with the same LLMs (docs/checkpoints.md#tokenizer).
    vocab = max(src_rows, n_tokens) if route == "internvl2" else n_tokens
    if n_before > src_rows:
        raise ConfigError(f"{where}: the tokenizer has {n_before} tokens but the embedding only {src_rows} rows")

    # ---- the target config -----------------------------------------------------------------------
    from phantom_ray.processing.tokenizers import END_TOKENS

    llm_cfg.vocab_size = vocab
    llm_cfg.tie_word_embeddings = preset.llm_config.tie_word_embeddings
    if llm_cfg.pad_token_id is None and getattr(tok, "pad_token_id", None) is not None:
        llm_cfg.pad_token_id = int(tok.pad_token_id)
    config = preset.replace(
        vision_config=vis_cfg, llm_config=llm_cfg, force_image_size=force_image_size,
        image_token_index=int(tok.convert_tokens_to_ids("<IMG_CONTEXT>")),
        img_start_token_index=int(tok.convert_tokens_to_ids("<img>")),
        img_end_token_index=int(tok.convert_tokens_to_ids("</img>")),
        eos_token_id=int(tok.convert_tokens_to_ids(END_TOKENS[preset.template])),
    )
    if vocab != preset.llm_config.vocab_size:
        logger.info("vocabulary %d (preset %s says %d): the vocabulary follows the tokenizer", vocab, size,
                    preset.llm_config.vocab_size)
    check_image_token(tok, config, where=where)
    PhantomProcessor(config, tok)  # every token the prompts need is one token with the config's id

    # ---- tensors ---------------------------------------------------------------------------------
    with torch.device("meta"):
        model = PhantomForCausalLM(config, attn_implementation="sdpa")
    from phantom_ray.model.loading import expected_keys

    target_shapes = {k: v.shape for k, v in model.state_dict().items()}
    target_keys = sorted(expected_keys(model))
    plan = build_plan(target_keys, sources, route, embed_name, head_name, config.llm_config.tie_word_embeddings)
    want_dtype = None if dtype == "source" else getattr(torch, dtype)
    sd: dict[str, torch.Tensor] = {}
    for t in target_keys:
        if t in plan.fresh:
            continue
        s, k = plan.copied[t]
        x = sources[s].get(k)
        if t in plan.vocab_keys:
            x = _vocab_rows(x, vocab, n_before, added_ids)
        if tuple(x.shape) != tuple(target_shapes[t]):
            raise SizeMismatchError(f"{sources[s].name}: tensor {k} has shape {tuple(x.shape)} but {t} of --size {size} "
                                    f"needs {tuple(target_shapes[t])}")
        sd[t] = x.to(want_dtype) if want_dtype is not None and x.is_floating_point() else x
    fresh_dtype = want_dtype or sd[embed_name].dtype
    g = torch.Generator().manual_seed(int(seed))
    std = config.llm_config.initializer_range
    for t in plan.fresh:  # sorted, so the values depend on the seed only
        sd[t] = _init_fresh(t, target_shapes[t], std, g).to(fresh_dtype)
    for s in sources.values():
        s.close()
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if k in target_keys]
    if missing or unexpected:  # the plan covers every key: this is a bug, not a user error
        raise RuntimeError(f"model init: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.llm_config.tie_word_embeddings:
        model.language_model.head.weight = model.language_model.model.embed.weight

    counts = {"copied": len(plan.copied), "fresh": len(plan.fresh),
              "fresh_params": sum(sd[t].numel() for t in plan.fresh),
              "params": sum(v.numel() for v in sd.values())}
    info = {"size": size, "route": route, "source": source, "vision": vision, "llm": llm, "seed": int(seed),
            "dtype": dtype, "added_tokens": dict(zip(added, added_ids)), "vocab_size": vocab,
            "source_vocab_rows": src_rows, "head_from_embedding": plan.head_from_embedding,
            "fresh": sorted({re.sub(r"\.layers\.\d+\.", ".layers.{i}.", k) for k in plan.fresh}), **counts}
    extra = tokenizer_files(tok, config)  # the one tokenizer save (with the chat template), as the training export
    for p in sorted(Path(tok_dir).iterdir()):
        if _TOKENIZER_CODE.match(p.name) and p.name not in extra:
            extra[p.name] = p.read_bytes()
    extra["init.json"] = json.dumps(info, indent=2).encode()
    model.save_pretrained(output, max_shard_bytes=max_shard_bytes, extra_files=extra)
    logger.info("wrote %s: %d tensors copied, %d fresh (%d parameters), tokens added: %s", output,
                counts["copied"], counts["fresh"], counts["fresh_params"], added or "none")
    return InitResult(output=str(output), config=config, plan=plan, added_tokens=added, vocab_size=vocab,
                      source_vocab_rows=src_rows, counts=counts)
