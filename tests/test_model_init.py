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
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from phantom_ray.convert import SizeMismatchError, init_checkpoint
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
    # saved as the training export saves (tokenizer_files): tokenizer, chat template, stop tokens
    tokenizer_file = "tokenizer.model" if family == "internlm2" else "tokenizer.json"
    for name in ("chat_template.jinja", "generation_config.json", tokenizer_file, "tokenizer_config.json"):
        assert (tmp_path / "out" / name).exists(), name


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


def test_cli_and_job_entry_point(tmp_path, capsys):
    """The verb through the CLI main function, and jobs/init.py (same arguments; its docstring holds
    the ``ray job submit`` command)."""
    import importlib.util

    from phantom_ray.cli import main

    src = write_internvl2(tmp_path / "src", "phi3")
    assert main(["model", "init", "--size", "tiny-phi3", "--source", str(src), "--output", str(tmp_path / "a"),
                 "--seed", "7"]) == 0
    assert f"wrote {tmp_path / 'a'}" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "init.json").read_text())["seed"] == 7
    spec = importlib.util.spec_from_file_location("_job_init", REPO / "jobs" / "init.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert "ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/init.py" in \
        " ".join(job.__doc__.split())
    vision, llm = write_vision_and_llm(tmp_path / "parts", "phi3")
    assert job.main(["--size", "tiny-phi3", "--vision", str(vision), "--llm", str(llm), "--output", str(tmp_path / "b"),
                     "--dtype", "bfloat16"]) == 0
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


# ------------------------------------------------------------------------------------------------
# by outputs: LLM logits against transformers' classes, vision features against plain torch
# ------------------------------------------------------------------------------------------------

def _hf_eval(model: torch.nn.Module) -> torch.nn.Module:
    return model.double().eval()


def _hf_config(family: str, d: dict):
    """transformers' config for an upstream LLM config dict (InternVL2's llm_config or config.json)."""
    from transformers import Phi3Config, Qwen2Config

    cfg = (Qwen2Config if family == "qwen2" else Phi3Config).from_dict(
        {k: v for k, v in d.items() if k not in ("attn_implementation", "architectures")})
    cfg._attn_implementation = "sdpa"  # transformers' eager softmax runs in float32 even for float64
    return cfg


def llama_from_internlm2(d: dict, sd: dict[str, torch.Tensor], prefix: str = "") -> torch.nn.Module:
    """transformers has no InternLM2: it is a Llama whose packed ``wqkv`` (per kv group: r query
    heads, the key head, the value head) unpacks into q/k/v (as tests/test_hf_parity.py does)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    H, Hk, C = d["num_attention_heads"], d["num_key_value_heads"], d["hidden_size"]
    D, r = C // H, H // Hk
    rope = d.get("rope_scaling")
    cfg = LlamaConfig(vocab_size=d["vocab_size"], hidden_size=C, intermediate_size=d["intermediate_size"],
                      num_hidden_layers=d["num_hidden_layers"], num_attention_heads=H, num_key_value_heads=Hk,
                      rms_norm_eps=d["rms_norm_eps"], max_position_embeddings=d["max_position_embeddings"],
                      rope_theta=d["rope_theta"], tie_word_embeddings=False, attention_bias=d["bias"], mlp_bias=False,
                      rope_scaling={"rope_type": rope["type"], "factor": float(rope["factor"])} if rope else None)
    cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(cfg)
    new = {"model.embed_tokens.weight": sd[prefix + "model.tok_embeddings.weight"],
           "model.norm.weight": sd[prefix + "model.norm.weight"], "lm_head.weight": sd[prefix + "output.weight"]}
    for i in range(d["num_hidden_layers"]):
        p, q = f"{prefix}model.layers.{i}.", f"model.layers.{i}."
        w = sd[p + "attention.wqkv.weight"].view(Hk, r + 2, D, C)
        new.update({q + "self_attn.q_proj.weight": w[:, :r].reshape(H * D, C),
                    q + "self_attn.k_proj.weight": w[:, -2].reshape(Hk * D, C),
                    q + "self_attn.v_proj.weight": w[:, -1].reshape(Hk * D, C),
                    q + "self_attn.o_proj.weight": sd[p + "attention.wo.weight"],
                    q + "mlp.gate_proj.weight": sd[p + "feed_forward.w1.weight"],
                    q + "mlp.up_proj.weight": sd[p + "feed_forward.w3.weight"],
                    q + "mlp.down_proj.weight": sd[p + "feed_forward.w2.weight"],
                    q + "input_layernorm.weight": sd[p + "attention_norm.weight"],
                    q + "post_attention_layernorm.weight": sd[p + "ffn_norm.weight"]})
    hf.load_state_dict(new, strict=True)
    return _hf_eval(hf)


def hf_from_internvl2(src: Path, family: str) -> torch.nn.Module:
    """The source's LLM as transformers runs it: ``language_model.*`` of the InternVL2 checkpoint."""
    from transformers import Phi3ForCausalLM, Qwen2ForCausalLM

    d = json.loads((src / "config.json").read_text())["llm_config"]
    sd = read_tensors(src)
    if family == "internlm2":
        return llama_from_internlm2(d, sd, prefix="language_model.")
    hf = (Qwen2ForCausalLM if family == "qwen2" else Phi3ForCausalLM)(_hf_config(family, d))
    hf.load_state_dict({k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")},
                       strict=True)
    return _hf_eval(hf)


def hf_from_base(llm: Path, family: str) -> torch.nn.Module:
    """The base LLM as transformers loads it from its own directory."""
    from transformers import Phi3ForCausalLM, Qwen2ForCausalLM

    if family == "internlm2":
        return llama_from_internlm2(json.loads((llm / "config.json").read_text()), read_tensors(llm))
    cls = Qwen2ForCausalLM if family == "qwen2" else Phi3ForCausalLM
    return _hf_eval(cls.from_pretrained(str(llm), dtype=torch.float64, attn_implementation="sdpa"))


def _ours(out: Path):
    from phantom_ray.model import PhantomForCausalLM

    model = PhantomForCausalLM.from_pretrained(str(out), attn_implementation="eager").double().eval()
    model.use_phantom = False  # the original's turn_on_phantom = False: the base LLM exactly
    return model


def _logits_diff(ours, hf, n_tokens: int, L: int) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, n_tokens, (2, L), generator=g)
    with torch.no_grad():
        got = ours(ids).logits[..., :n_tokens]
        want = hf(input_ids=ids).logits[..., :n_tokens]
    return (got.double() - want).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_internvl2_logits_equal_transformers(tmp_path, family):
    src = write_internvl2(tmp_path / "src", family)
    init_checkpoint(TINY_SIZE[family], str(tmp_path / "out"), source=str(src))
    ours, hf = _ours(tmp_path / "out"), hf_from_internvl2(src, family)
    vocab = ours.config.llm_config.vocab_size
    assert vocab == hf.config.vocab_size
    # our head returns float32 logits (as the original's .float()): equal up to float32 rounding
    assert _logits_diff(ours, hf, vocab, L=12) < 1e-5
    if family == "phi3":  # past original_max_position_embeddings (64): longrope's long factors
        assert _logits_diff(ours, hf, vocab, L=80) < 1e-5
    # the freshly initialised phantom branch is a near-identity at the default eta (docs/phantom.md#near-identity)
    ours.use_phantom = True
    assert 0 < _logits_diff(ours, hf, vocab, L=12) < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_and_llm_logits_equal_transformers(tmp_path, family):
    from phantom_ray.processing.tokenizers import load_checkpoint_tokenizer

    vision, llm = write_vision_and_llm(tmp_path / "src", family)
    n_before = len(load_checkpoint_tokenizer(llm, "phi3" if family == "phi3" else "chatml"))
    init_checkpoint(TINY_SIZE[family], str(tmp_path / "out"), vision=str(vision), llm=str(llm))
    ours, hf = _ours(tmp_path / "out"), hf_from_base(llm, family)
    # the base tokenizer's tokens (the added ones are new rows, the source's padding rows are gone)
    assert _logits_diff(ours, hf, n_before, L=12) < 1e-5


def vision_features(sd: dict[str, torch.Tensor], vcfg: dict, proj: dict[str, torch.Tensor],
                    pixels: torch.Tensor) -> torch.Tensor:
    """InternViT + pixel shuffle + projector written out in plain torch from the upstream description
    (docs/checkpoints.md): patch conv, CLS, position embedding, pre-norm blocks with layer scale,
    CLS dropped, 2x2 neighbours concatenated, LayerNorm -> Linear -> GELU -> Linear."""
    C, H, P = vcfg["hidden_size"], vcfg["num_attention_heads"], vcfg["patch_size"]
    N = pixels.shape[0]
    x = F.conv2d(pixels, sd["embeddings.patch_embedding.weight"], sd["embeddings.patch_embedding.bias"], stride=P)
    side = x.shape[-1]
    x = torch.cat([sd["embeddings.class_embedding"].expand(N, 1, C), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + sd["embeddings.position_embedding"]
    L = x.shape[1]
    for i in range(vcfg["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        h = F.layer_norm(x, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=vcfg["layer_norm_eps"])
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).view(N, L, 3, H, C // H).unbind(2)
        att = torch.softmax(torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(C // H), dim=-1)
        o = torch.einsum("nhqk,nkhd->nqhd", att, v).reshape(N, L, C)
        x = x + F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]) * sd[p + "ls1"]
        h = F.layer_norm(x, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=vcfg["layer_norm_eps"])
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + h * sd[p + "ls2"]
    grid = x[:, 1:].reshape(N, side, side, C)
    tokens = [torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j],
                         grid[:, 2 * i + 1, 2 * j + 1]], dim=-1) for i in range(side // 2) for j in range(side // 2)]
    y = torch.stack(tokens, dim=1)  # (N, side^2/4, 4C), row-major over the 2x2 blocks
    y = F.layer_norm(y, (4 * C,), proj["0.weight"], proj["0.bias"])
    return F.linear(F.gelu(F.linear(y, proj["1.weight"], proj["1.bias"])), proj["3.weight"], proj["3.bias"])


@pytest.mark.parametrize("route", ["internvl2", "vision+llm"])
def test_vision_features_equal_plain_torch(tmp_path, route):
    if route == "internvl2":
        src = write_internvl2(tmp_path / "src", "qwen2")
        init_checkpoint("tiny-qwen2", str(tmp_path / "out"), source=str(src))
        sd = read_tensors(src)
        vis = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
        proj = {k[len("mlp1."):]: v for k, v in sd.items() if k.startswith("mlp1.")}
        vcfg = json.loads((src / "config.json").read_text())["vision_config"]
    else:  # InternViT from its own directory; the projector is the fresh one of the output
        vision, llm = write_vision_and_llm(tmp_path / "src", "internlm2")
        init_checkpoint("tiny-internlm2", str(tmp_path / "out"), vision=str(vision), llm=str(llm))
        vis, vcfg = read_tensors(vision), json.loads((vision / "config.json").read_text())
        out_sd = read_tensors(tmp_path / "out")
        proj = {k[len("vision_proj."):]: v for k, v in out_sd.items() if k.startswith("vision_proj.")}
    ours = _ours(tmp_path / "out")
    pixels = torch.randn(3, 3, vcfg["image_size"], vcfg["image_size"], generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    with torch.no_grad():
        got = ours.extract_feature(pixels)
    want = vision_features({k: v.double() for k, v in vis.items()}, vcfg, {k: v.double() for k, v in proj.items()}, pixels)
    assert got.shape == want.shape == (3, ours.config.num_image_token, ours.config.llm_config.hidden_size)
    assert (got - want).abs().max().item() < 1e-10


def test_qwen2_window_that_is_not_used_is_dropped():
    """Qwen2 configs (InternVL2-1B's llm_config, Qwen2-0.5B-Instruct) say sliding_window 32768 with
    use_sliding_window false: no window applies."""
    from phantom_ray.model.config import LLMConfig

    d = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "sliding_window": 32768, "use_sliding_window": False}
    assert LLMConfig.from_dict(d).sliding_window is None
    assert LLMConfig.from_dict({**d, "use_sliding_window": True}).sliding_window == 32768
