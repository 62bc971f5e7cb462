"""Checkpoints in Hugging Face layout: ``config.json`` + (sharded) ``model.safetensors``.

Loads the released ``BK-Lee/Phantom-*`` checkpoints by their exact key names (docs/phantom.md#checkpoint-keys) from a local
directory, from ``s3://bucket/prefix`` (boto3, endpoint and credentials from the standard AWS
environment, so any S3-compatible store works) or from a hub id where the network allows.
Missing or unexpected keys fail with a message listing them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from phantom_ray.model.config import PhantomConfig

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
               "tokenization_internlm2.py", "chat_template.jinja")
# the 8-bit skip list of the original with its stale `mlp1` replaced by `vision_proj` (docs/phantom.md#d12-int8-skip-list)
INT8_SKIP_COMMON = ["linear_q", "linear_k", "linear_v", "linear_o", "gating_phantom_1", "gating_phantom_2",
                    "phantom", "vision_proj"]
INT8_SKIP_FAMILY = {"qwen2": ["q_proj", "k_proj", "v_proj", "lm_head"], "internlm2": ["wqkv", "output"],
                    "phi3": ["qkv_proj", "lm_head"]}


def cache_root() -> Path:
    """The one cache root for every download (checkpoints, tokenizer files, materialised presets):
    ``$PHANTOM_RAY_CACHE``, default ``~/.cache/phantom_ray``."""
    return Path(os.environ.get("PHANTOM_RAY_CACHE", Path.home() / ".cache" / "phantom_ray"))


def is_hub_id(model_id: str) -> bool:
    """True for a Hugging Face hub id (``org/name``) that is not a local path: the one hub-id guess
    (the checkpoint and the tokenizer resolve a model id the same way)."""
    s = str(model_id)
    return (not s.startswith("s3://") and s.count("/") == 1 and not s.startswith((".", "/", "~"))
            and not os.path.exists(os.path.expanduser(s)))


def resolve_checkpoint(path_or_uri: str) -> Path:
    """Local directory for a local path, an ``s3://`` prefix (downloaded once) or a hub id."""
    if str(path_or_uri).startswith("s3://"):
        from phantom_ray import storage

        key = hashlib.sha256(str(path_or_uri).encode()).hexdigest()[:16]
        local = cache_root() / "s3" / key
        marker = local / ".complete"
        if not marker.exists():
            import shutil

            tmp = local.with_name(local.name + f".tmp{os.getpid()}")
            storage.download_dir(str(path_or_uri), str(tmp))
            if not (tmp / "config.json").exists():
                shutil.rmtree(tmp, ignore_errors=True)
                raise FileNotFoundError(f"{path_or_uri} has no config.json: not a Phantom checkpoint")
            (tmp / ".complete").write_text(str(path_or_uri))
            if local.exists():
                import shutil

                shutil.rmtree(local)
            os.replace(tmp, local)
        return local
    p = Path(path_or_uri).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} has no config.json: not a Phantom checkpoint directory")
        return p
    if p.exists():
        raise NotADirectoryError(f"{p} is a file; a checkpoint is a directory with config.json")
    if is_hub_id(str(path_or_uri)):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path_or_uri), allow_patterns=["*.json", "*.safetensors", *_SIDE_FILES],
                                          cache_dir=str(cache_root() / "hub")))
        except Exception as exc:  # network errors come in many types; say what was tried
            raise OSError(f"could not fetch {path_or_uri!r} from the hub (no network?): {exc}") from exc
    raise FileNotFoundError(f"checkpoint {path_or_uri!r} is neither a local directory, an s3:// URI nor a hub id")


def remap_key(key: str) -> str:
    # defensive: InternVL names the projector mlp1 (docs/phantom.md#checkpoint-keys)
    return "vision_proj." + key[len("mlp1."):] if key.startswith("mlp1.") else key


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / INDEX_NAME
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / WEIGHTS_NAME).exists():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(str(directory / f)).items():
            sd[remap_key(k)] = v
    return sd


def expected_keys(model) -> set[str]:
    keys = set(model.state_dict().keys())
    if model.config.llm_config.tie_word_embeddings:
        keys.discard(f"language_model.{model.language_model._head_name}.weight")
    return keys


def check_keys(model, keys: set[str]) -> None:
    expected = expected_keys(model)
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    if missing or unexpected:
        def show(ks):
            return ", ".join(ks[:20]) + (f", ... ({len(ks)} in all)" if len(ks) > 20 else "")

        raise ValueError(
            "checkpoint keys do not match the model: "
            + (f"missing {len(missing)}: {show(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)}: {show(unexpected)}" if unexpected else "")
        )


def from_pretrained(path_or_uri: str, dtype: torch.dtype | str | None = None, attn_implementation: str | None = "sdpa",
                    device: str | torch.device = "cpu", load_in_8bit: bool = False, adapter: str = "merge",
                    **config_overrides):
    """``adapter``: a LoRA adapter saved next to the weights (an unmerged training export,
    :mod:`phantom_ray.model.adapters`) is merged into them (``"merge"``, the default: the model as
    trained), or left out on purpose (``"skip"``: the base weights, e.g. for peft to wrap)."""
    from phantom_ray.model.adapters import has_adapter, merge_adapter_into
    from phantom_ray.model.modeling import PhantomForCausalLM

    if adapter not in ("merge", "skip"):
        raise ValueError(f"adapter={adapter!r}: expected 'merge' or 'skip'")
    directory = resolve_checkpoint(str(path_or_uri))
    config = PhantomConfig.from_json_file(directory / "config.json")
    for k, v in config_overrides.items():
        setattr(config, k, v)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = PhantomForCausalLM(config, attn_implementation=attn_implementation)
    sd = read_state_dict(directory)
    check_keys(model, set(sd))
    if adapter == "merge" and has_adapter(directory):
        merge_adapter_into(sd, directory)  # in the checkpoint's dtype (fp32 exports), before any cast
    for k, v in sd.items():
        if dtype is not None and v.is_floating_point():
            sd[k] = v.to(dtype)
    model.load_state_dict(sd, strict=False, assign=True)
    if config.llm_config.tie_word_embeddings:
        model.language_model.head.weight = model.language_model.model.embed.weight
    model.to(device)
    model.name_or_path = str(path_or_uri)
    if load_in_8bit:
        quantize_8bit(model)
    return model.eval()


def save_pretrained(model, directory: str, max_shard_bytes: int = 4 * 1024**3, extra_files: dict[str, bytes] | None = None):
    """Write ``config.json`` and safetensors shards (with an index when more than one) to a local
    directory or an ``s3://`` prefix."""
    from safetensors.torch import save_file

    is_s3 = str(directory).startswith("s3://")
    if is_s3:
        import tempfile

        tmp = tempfile.mkdtemp(prefix="phantom-save-")
        save_pretrained(model, tmp, max_shard_bytes, extra_files)
        from phantom_ray import storage

        storage.upload_dir(tmp, str(directory))
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k in expected_keys(model)}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += n
    model.config.save(out)
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for name, data in (extra_files or {}).items():
        (out / name).write_bytes(data)


def quantize_8bit(model) -> None:
    """Replace linears by bitsandbytes int8 linears, except the corrected skip list (docs/phantom.md#d12-int8-skip-list)."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError("load_in_8bit needs bitsandbytes (pip install bitsandbytes) and a CUDA device") from exc
    skip = INT8_SKIP_COMMON + INT8_SKIP_FAMILY[model.config.family]
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Linear) and not any(s in full for s in skip):
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
                q.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
                if child.bias is not None:
                    q.bias = child.bias
                setattr(module, child_name, q.to(child.weight.device))
