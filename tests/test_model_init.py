"""``phantom-ray model init``: starting weights from upstream checkpoints (docs/checkpoints.md).

Tiny checkpoints in each upstream layout (``tests/upstream_checkpoints.py``) are converted and checked
key by key (every source tensor lands at its key with equal values; every other target tensor is in
the documented fresh set) and by outputs (phantom branch off: our LLM logits equal the source's own
forward through transformers' classes; the vision tower + projector equal a plain-torch evaluation of
the source weights); sources from s3://, size mismatches, the CLI and ``jobs/init.py``, and a
generation through ``load_engine`` on the result.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from phantom_ray.model.convert import SizeMismatchError, init_checkpoint
from upstream_checkpoints import FAMILIES, TINY_SIZE, write_internvl2, write_vision_and_llm

REPO = Path(__file__).resolve().parents[1]
EMBED = {"qwen2": "model.embed_tokens.weight", "phi3": "model.embed_tokens.weight",
         "internlm2": "model.tok_embeddings.weight"}
HEAD = {"qwen2": "lm_head.weight", "phi3": "lm_head.weight", "internlm2": "output.weight"}


def read_tensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or shards), read independently of the converter."""
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(d / f)))
    return out


def phantom_keys(num_layers: int, family: str) -> set[str]:
    attn = "attention" if family == "internlm2" else "self_attn"
    keys = set()
    for i in range(num_layers):
        p = f"language_model.model.layers.{i}.{attn}."
        keys |= {p + f"xattn_{a}_phantom.linear_{b}.weight" for a in ("query", "key", "value") for b in "qkvo"}
        keys |= {p + f"gating_phantom_{j}.{w}" for j in (1, 2) for w in ("weight", "bias")}
    return keys


def _num_layers(out: Path) -> int:
    return json.loads((out / "config.json").read_text())["llm_config"]["num_hidden_layers"]


def _check_fresh(out_sd: dict, fresh: set[str]) -> None:
    for k in fresh:
        v = out_sd[k]
        if k.endswith(".bias"):
            assert torch.count_nonzero(v) == 0, k
        elif k == "vision_proj.0.weight":
            assert torch.all(v == 1), k
        else:  # N(0, 0.02)
            assert 0.005 < v.float().std().item() < 0.05, (k, v.float().std().item())


# ------------------------------------------------------------------------------------------------
# key by key
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_internvl2_key_by_key(tmp_path, family):
    src = write_internvl2(tmp_path / "src", family, shards=2 if family == "internlm2" else 1)
    res = init_checkpoint(TINY_SIZE[family], str(tmp_path / "out"), source=str(src), seed=3)
    assert res.added_tokens == []  # an InternVL2 tokenizer has everything the processor needs
    src_sd, out_sd = read_tensors(src), read_tensors(tmp_path / "out")
    converted = set()
    for k, v in src_sd.items():
        t = "vision_proj." + k[len("mlp1."):] if k.startswith("mlp1.") else k
        assert t in out_sd, f"{k} -> {t} missing from the output"
        assert out_sd[t].dtype == v.dtype and torch.equal(out_sd[t], v), k
        converted.add(t)
    fresh = set(out_sd) - converted
    assert fresh == phantom_keys(_num_layers(tmp_path / "out"), family)
    assert sorted(fresh) == sorted(res.plan.fresh)
    _check_fresh(out_sd, fresh)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    assert cfg["llm_config"]["vocab_size"] == src_cfg["llm_config"]["vocab_size"]
    assert cfg["force_image_size"] == src_cfg["force_image_size"]
    assert cfg["max_dynamic_patch"] == 6  # Phantom's tiling (InternVL2 says 12)
    init = json.loads((tmp_path / "out" / "init.json").read_text())
    assert init["route"] == "internvl2" and init["seed"] == 3
    assert (tmp_path / "out" / "chat_template.jinja").exists()  # saved as the training export saves


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_and_llm_key_by_key(tmp_path, family):
    from phantom_ray.processing.tokenizers import INTERNVL_TOKENS, load_checkpoint_tokenizer, load_tokenizer

    vision, llm = write_vision_and_llm(tmp_path / "src", family, shards=2 if family == "phi3" else 1)
    template = "phi3" if family == "phi3" else "chatml"
    n_before = len(load_checkpoint_tokenizer(llm, template))
    res = init_checkpoint(TINY_SIZE[family], str(tmp_path / "out"), vision=str(vision), llm=str(llm), seed=3)
    assert res.added_tokens == list(INTERNVL_TOKENS)
    vis_sd, llm_sd, out_sd = read_tensors(vision), read_tensors(llm), read_tensors(tmp_path / "out")
    out = tmp_path / "out"
    tok = load_tokenizer(str(out))  # checks <IMG_CONTEXT> against config.json
    added_ids = [tok.convert_tokens_to_ids(t) for t in INTERNVL_TOKENS]
    assert added_ids == list(range(n_before, n_before + len(INTERNVL_TOKENS)))  # InternVL2's ids: appended in order
    vocab = json.loads((out / "config.json").read_text())["llm_config"]["vocab_size"]
    assert vocab == n_before + len(INTERNVL_TOKENS)
    converted = set()
    for k, v in vis_sd.items():
        assert torch.equal(out_sd["vision_model." + k], v), k
        converted.add("vision_model." + k)
    for k, v in llm_sd.items():
        t = "language_model." + k
        if k in (EMBED[family], HEAD[family]):
            # kept rows equal; the added tokens' rows start at the mean of the tokenizer's rows; rows
            # past the tokenizer (the source's vocabulary padding) are dropped
            assert out_sd[t].shape[0] == vocab
            assert torch.equal(out_sd[t][:n_before], v[:n_before]), k
            assert torch.allclose(out_sd[t][n_before:], v[:n_before].mean(0).expand(len(added_ids), -1)), k
        else:
            assert torch.equal(out_sd[t], v), k
        converted.add(t)
    head = "language_model." + HEAD[family]
    if HEAD[family] not in llm_sd:  # tied source (like Qwen2-0.5B-Instruct): the head starts as the embedding
        assert family == "qwen2" and res.plan.head_from_embedding
        assert torch.equal(out_sd[head][:n_before], llm_sd[EMBED[family]][:n_before])
        converted.add(head)
    fresh = set(out_sd) - converted
    projector = {f"vision_proj.{i}.{w}" for i in (0, 1, 3) for w in ("weight", "bias")}
    assert fresh == phantom_keys(_num_layers(out), family) | projector
    _check_fresh(out_sd, fresh)

    # deterministic with --seed: the same seed gives the same fresh tensors, another seed others
    init_checkpoint(TINY_SIZE[family], str(tmp_path / "again"), vision=str(vision), llm=str(llm), seed=3)
    init_checkpoint(TINY_SIZE[family], str(tmp_path / "other"), vision=str(vision), llm=str(llm), seed=4)
    again, other = read_tensors(tmp_path / "again"), read_tensors(tmp_path / "other")
    assert all(torch.equal(again[k], out_sd[k]) for k in out_sd)
    w = "language_model.model.layers.0." + ("attention" if family == "internlm2" else "self_attn") + \
        ".xattn_query_phantom.linear_q.weight"
    assert not torch.equal(other[w], out_sd[w]) and not torch.equal(other["vision_proj.1.weight"], out_sd["vision_proj.1.weight"])


# ------------------------------------------------------------------------------------------------
# errors, storage, entry points
# ------------------------------------------------------------------------------------------------

def test_size_mismatch_is_one_line_naming_the_field(tmp_path, capsys):
    from phantom_ray.cli import main

    src = write_internvl2(tmp_path / "src", "qwen2")
    with pytest.raises(SizeMismatchError, match=r"llm_config\.hidden_size is 64 but --size phantom-0\.5b needs 896"):
        init_checkpoint("phantom-0.5b", str(tmp_path / "out"), source=str(src))
    with pytest.raises(SizeMismatchError, match=r"llm_config\.architectures \(family\) is 'qwen2'.*'internlm2'"):
        init_checkpoint("tiny-internlm2", str(tmp_path / "out"), source=str(src))
    rc = main(["model", "init", "--size", "phantom-0.5b", "--source", str(src), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "llm_config.hidden_size" in err and "InternVL2-1B" in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_refuses_other_internvl_variants_and_mixed_arguments(tmp_path):
    from phantom_ray.config import ConfigError

    src = write_internvl2(tmp_path / "src", "qwen2")
    cfg = json.loads((src / "config.json").read_text())
    cfg["ps_version"] = "v1"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SizeMismatchError, match="ps_version is 'v1'"):
        init_checkpoint("tiny-qwen2", str(tmp_path / "out"), source=str(src))
    with pytest.raises(ConfigError, match="--source .* or --vision and --llm"):
        init_checkpoint("tiny-qwen2", str(tmp_path / "out"), source=str(src), vision=str(src), llm=str(src))
    vision, llm = write_vision_and_llm(tmp_path / "parts", "qwen2")
    with pytest.raises(ConfigError, match="pass it as --source"):
        init_checkpoint("tiny-qwen2", str(tmp_path / "out"), vision=str(src), llm=str(llm))


def test_source_and_output_on_s3(tmp_path, monkeypatch, s3_bucket):
    from phantom_ray import storage
    from phantom_ray.loader import load_model

    monkeypatch.setenv("PHANTOM_RAY_CACHE", str(tmp_path / "cache"))
    src = write_internvl2(tmp_path / "src", "internlm2", shards=2)
    storage.upload_dir(str(src), f"{s3_bucket}/upstream/InternVL2-tiny")
    out = f"{s3_bucket}/init/tiny-internlm2-internvl2-init"
    init_checkpoint("tiny-internlm2", out, source=f"{s3_bucket}/upstream/InternVL2-tiny")
    assert storage.exists(f"{out}/config.json") and storage.exists(f"{out}/tokenizer.model")
    loaded = load_model(out, device="cpu", dtype="float32")
    want = read_tensors(src)["language_model.model.layers.1.attention.wqkv.weight"]
    assert torch.equal(loaded.model.language_model.model.layers[1].attention.wqkv.weight, want)
    with pytest.raises(Exception, match="--overwrite"):
        init_checkpoint("tiny-internlm2", out, source=f"{s3_bucket}/upstream/InternVL2-tiny")


def test_cli_and_job_entry_point(tmp_path):
    from phantom_ray.cli import main

    src = write_internvl2(tmp_path / "src", "phi3")
    assert main(["model", "init", "--size", "tiny-phi3", "--source", str(src), "--output", str(tmp_path / "a"),
                 "--seed", "7"]) == 0
    vision, llm = write_vision_and_llm(tmp_path / "parts", "phi3")
    job = subprocess.run([sys.executable, str(REPO / "jobs" / "init.py"), "--size", "tiny-phi3", "--vision", str(vision),
                          "--llm", str(llm), "--output", str(tmp_path / "b"), "--dtype", "bfloat16"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert job.returncode == 0, job.stderr[-2000:]
    assert "wrote" in job.stdout
    assert all(v.dtype == torch.bfloat16 for v in read_tensors(tmp_path / "b").values())


@pytest.mark.parametrize("family", FAMILIES)
def test_output_loads_in_the_engine_and_generates(tmp_path, family):
    from PIL import Image

    from phantom_ray.infer.api import Request, SamplingParams, load_engine

    src = write_internvl2(tmp_path / "src", family)
    init_checkpoint(TINY_SIZE[family], str(tmp_path / "out"), source=str(src))
    engine = load_engine(str(tmp_path / "out"), backend="torch")
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    [gen] = engine.generate([Request.user("What color is the shape?", images=[image],
                                          params=SamplingParams(max_tokens=4))])
    assert gen.completion_tokens >= 1 and gen.finish_reason in ("stop", "length")
