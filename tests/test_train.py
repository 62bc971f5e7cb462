"""Training: PO loss, config, two-step recipe under DeepSpeed (one process), resume and export.

The Ray Train runs (2 workers, ZeRO-2/3, learning, S3, killed worker) are in test_train_ray.py.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from phantom_ray.train.config import TrainConfig
from phantom_ray.train.loss import po_preference, preference_loss, sequence_logps, sft_loss

from helpers import tiny_processor
from train_helpers import pair_batches, po_pairs, tiny_cfg

torch.set_num_threads(1)


# ---- loss ------------------------------------------------------------------------------------------

def _toy_logits():
    """Vocab 3, length 3; row 0 chosen, row 1 rejected; answer = last two positions' targets."""
    logits = torch.tensor([
        [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    ])
    labels = torch.tensor([[-100, 0, 1], [-100, 2, 2]])
    return logits, labels


def test_sequence_logps_by_hand():
    logits, labels = _toy_logits()
    lp, n = sequence_logps(logits, labels)
    # row 0: log softmax([2,0,0])[0] + log softmax([0,1,0])[1]
    z0 = math.log(math.exp(2) + 2)
    z1 = math.log(math.exp(1) + 2)
    expect0 = (2 - z0) + (1 - z1)
    # row 1: log softmax([0,0,1])[2] + log softmax([1,0,0])[2]
    expect1 = (1 - z1) + (0 - z1)
    assert torch.allclose(lp, torch.tensor([expect0, expect1]), atol=1e-6)
    assert n.tolist() == [2.0, 2.0]


def test_po_loss_matches_hand_computed_value():
    logits, labels = _toy_logits()
    beta, gamma, w = 2.0, 0.5, 0.7
    out = preference_loss(logits, labels, kind="po", beta=beta, gamma=gamma, pref_weight=w,
                          has_rejected=torch.tensor([True]))
    z0, z1 = math.log(math.exp(2) + 2), math.log(math.exp(1) + 2)
    lc, lr = (2 - z0) + (1 - z1), (1 - z1) + (0 - z1)
    margin = beta / 2 * lc - beta / 2 * lr
    pref = -math.log(1 / (1 + math.exp(-(margin - gamma))))
    sft = -lc / 2  # token-mean CE of the chosen row
    assert out.pref_loss.item() == pytest.approx(pref, rel=1e-6)
    assert out.sft_loss.item() == pytest.approx(sft, rel=1e-6)
    assert out.loss.item() == pytest.approx(sft + w * pref, rel=1e-6)
    assert out.reward_margin.item() == pytest.approx(margin, rel=1e-6)
    assert out.pref_accuracy.item() == (1.0 if margin > 0 else 0.0)


def test_po_loss_gradient_sign():
    """Raising logp of the rejected answer raises the loss; raising the chosen one lowers it."""
    logits, labels = _toy_logits()
    logits = logits.clone().requires_grad_(True)
    out = preference_loss(logits, labels, kind="po", beta=2.0, gamma=0.5, pref_weight=1.0, sft_weight=0.0,
                          has_rejected=torch.tensor([True]))
    out.loss.backward()
    # rejected row 1 targets token 2 at position 0 and token 2 at position 1
    assert logits.grad[1, 0, 2] > 0 and logits.grad[1, 1, 2] > 0
    assert logits.grad[0, 0, 0] < 0 and logits.grad[0, 1, 1] < 0
    # and directly: bump the rejected answer's logits -> the loss goes up
    base = out.loss.item()
    bumped = logits.detach().clone()
    bumped[1, 0, 2] += 1.0
    assert preference_loss(bumped, labels, kind="po", beta=2.0, gamma=0.5, sft_weight=0.0,
                           has_rejected=torch.tensor([True])).loss.item() > base


def test_unpaired_rows_contribute_only_sft():
    logits, labels = _toy_logits()
    out = preference_loss(logits, labels, kind="po", has_rejected=torch.tensor([False]))
    assert out.pref_loss.item() == 0.0 and out.num_pairs == 0
    assert out.loss.item() == pytest.approx(sft_loss(logits[:1], labels[:1]).item())
    sft = preference_loss(logits, labels, kind="sft")  # a plain SFT batch: every row
    assert sft.loss.item() == pytest.approx(sft_loss(logits, labels).item())
    assert sft.loss.item() == pytest.approx(F.cross_entropy(logits[:, :-1].reshape(-1, 3), labels[:, 1:].reshape(-1)).item())
    # SFT on a pair batch imitates the chosen rows only
    sft = preference_loss(logits, labels, kind="sft", has_rejected=torch.tensor([True]))
    assert sft.loss.item() == pytest.approx(sft_loss(logits[:1], labels[:1]).item()) and sft.pref_loss.item() == 0


def test_dpo_needs_and_uses_reference_logps():
    logits, labels = _toy_logits()
    with pytest.raises(ValueError, match="reference log-probs"):
        preference_loss(logits, labels, kind="dpo", has_rejected=torch.tensor([True]))
    lp, _ = sequence_logps(logits, labels)
    # the reference equal to the policy: margin 0, loss log 2
    out = preference_loss(logits, labels, kind="dpo", beta=0.1, sft_weight=0.0, has_rejected=torch.tensor([True]),
                          ref_chosen_logps=lp[:1], ref_rejected_logps=lp[1:])
    assert out.pref_loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_po_preference_length_normalised():
    loss_short, m1 = po_preference(torch.tensor([-2.0]), torch.tensor([2.0]), torch.tensor([-4.0]), torch.tensor([2.0]), 1.0, 0.0)
    loss_long, m2 = po_preference(torch.tensor([-4.0]), torch.tensor([4.0]), torch.tensor([-8.0]), torch.tensor([4.0]), 1.0, 0.0)
    assert m1.item() == pytest.approx(m2.item()) and loss_short.item() == pytest.approx(loss_long.item())


# ---- config ---------------------------------------------------------------------------------------------

def test_train_config_yaml_overrides_and_errors(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("data: {shards: /x, task: po}\noptim: {lr: 1.0e-3}\nrecipe: {step: 2}\n")
    cfg = TrainConfig.from_yaml(str(p), overrides=["optim.lr=3e-3", "run.max_steps=7", "deepspeed.zero_stage=3"])
    assert cfg.optim.lr == 3e-3 and cfg.run.max_steps == 7 and cfg.deepspeed.zero_stage == 3 and cfg.recipe.step == 2
    cfg.save(str(tmp_path / "saved.yaml"))
    assert TrainConfig.from_yaml(str(tmp_path / "saved.yaml")) == cfg
    with pytest.raises(ValueError, match=r"t.yaml.*optim.lrr"):
        TrainConfig.from_yaml(str(p), overrides=["optim.lrr=1"])
    with pytest.raises(ValueError, match=r"optim.lr: .*valid number.*'fast'"):
        TrainConfig.from_yaml(str(p), overrides=["optim.lr=fast"])
    with pytest.raises(ValueError, match=r"deepspeed.zero_stage"):
        TrainConfig.from_yaml(str(p), overrides=["deepspeed.zero_stage=4"])
    with pytest.raises(ValueError, match=r"needs data.task='po'"):
        TrainConfig.from_yaml(str(p), overrides=["data.task=sft"])
    with pytest.raises(ValueError, match=r"data: .*unknown data config field.*batch_sise"):
        TrainConfig.from_yaml(str(p), overrides=["data.batch_sise=2"])
    with pytest.raises(ValueError, match=r"data.model is not a training field"):
        TrainConfig.from_yaml(str(p), overrides=["data.model=tiny-qwen2"])


def test_model_named_once_and_relative_paths_resolved_against_the_launch_dir(tmp_path, monkeypatch):
    """#13 item 8: relative paths are made absolute on the driver, against where the user launched
    (Ray runs its workers in its session folder); URIs, presets and hub ids are left alone."""
    p = tmp_path / "conf" / "t.yaml"
    p.parent.mkdir()
    p.write_text("model: {init_from: ./ckpt/export}\ndata: {shards: runs/x/packed, task: po, val_shards: [heldout]}\n"
                 "loss: {reference: tiny-qwen2}\nrun: {storage_path: runs, name: r1}\n")
    (tmp_path / "launch" / "ckpt" / "export").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "launch")  # launched from here, config elsewhere
    cfg = TrainConfig.from_yaml(str(p))
    assert cfg.data.model == "./ckpt/export"  # the processor follows the model section
    r = cfg.resolved()
    launch = str(tmp_path / "launch")
    assert r.data.shards == [os.path.join(launch, "runs/x/packed")]
    assert r.data.val_shards == [os.path.join(launch, "heldout")]
    assert r.run.storage_path == os.path.join(launch, "runs")
    assert r.run.export_uri() == os.path.join(launch, "runs", "r1", "export")
    assert r.model.init_from == os.path.join(launch, "ckpt/export") and r.data.model == r.model.init_from
    assert r.loss.reference == "tiny-qwen2"  # a preset name is not a path
    s3 = TrainConfig.from_dict({"data": {"shards": "s3://b/p", "task": "po"}, "run": {"storage_path": "s3://b/runs"}})
    assert s3.resolved().data.shards == ["s3://b/p"] and s3.resolved().run.storage_path == "s3://b/runs"
    assert r.resolved() == r  # idempotent


@pytest.mark.parametrize("path", sorted((p for p in (__import__("pathlib").Path(__file__).parents[1] / "configs" / "train").glob("*.yaml")),
                                        key=str), ids=lambda p: p.name)
def test_every_train_config_loads(path):
    cfg = TrainConfig.from_yaml(str(path))
    assert cfg.data.shards


# ---- recipe (one process, DeepSpeed) ---------------------------------------------------------------------

def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def batches():
    return pair_batches(3, batch_size=4, seed=1)


def _recipe(cfg, total_steps=3):
    from phantom_ray.train.recipe import PhantomRecipe

    return PhantomRecipe(cfg).setup(total_steps)


def test_step1_trains_only_projector_and_phantom(tmp_path, batches):
    # Near-identity init (docs/phantom.md#near-identity): the q*/k* branches get gradients of ~1e-18 at step 0, which
    # Adam's default eps (1e-8) turns into updates below fp32 resolution; a tiny eps makes every
    # parameter that receives any gradient move, which is what this test checks.
    rec = _recipe(tiny_cfg(tmp_path, recipe={"step": 1}, optim={"eps": 1e-30}))
    before = _snapshot(rec.model)
    rec.train_epoch(batches)
    assert rec.state.step == 3
    trainable = set(rec.trainable_names)
    assert trainable == {n for n in before if n.startswith("vision_proj.") or "_phantom" in n}
    # no optimizer state for frozen parameters
    opt_params = {id(p) for g in rec.optimizer.param_groups for p in g["params"]}
    named = dict(rec.model.named_parameters())
    assert opt_params == {id(named[n]) for n in trainable}
    for n, p in rec.model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_step2_trains_everything_and_freeze_vision_option(tmp_path, batches):
    rec = _recipe(tiny_cfg(tmp_path, recipe={"step": 2}, optim={"eps": 1e-30}))
    before = _snapshot(rec.model)
    rec.train_epoch(batches)
    unchanged = [n for n, p in rec.model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"step 2 left parameters unchanged: {unchanged}"

    rec = _recipe(tiny_cfg(tmp_path, recipe={"step": 2, "freeze_vision": True}, optim={"eps": 1e-30}))
    before = _snapshot(rec.model)
    rec.train_epoch(batches[:1])
    for n, p in rec.model.named_parameters():
        assert torch.equal(p, before[n]) == n.startswith("vision_model."), n


def test_grad_accum_and_metrics(tmp_path, batches):
    rec = _recipe(tiny_cfg(tmp_path, recipe={"step": 2}, optim={"grad_accum": 3, "warmup_steps": 1}), total_steps=1)
    seen = []
    rec.train_epoch(batches, on_step=lambda r, m: seen.append(m))
    assert rec.state.step == 1 and len(seen) == 1
    m = seen[0]
    for key in ("loss", "sft_loss", "pref_loss", "reward_margin", "pref_accuracy", "tokens_per_s", "samples_per_s",
                "data_wait_s", "lr"):
        assert key in m and math.isfinite(m[key]), key
    assert m["samples"] == 12 and m["pref_loss"] > 0
    assert rec.state.consumed == [s for b in batches for s in b["sample_id"]]


def test_recipe_sets_up_after_the_process_group_is_torn_down_and_remade(tmp_path, batches):
    """Whoever destroys the process group (an in-process vLLM engine does, and then makes its own)
    leaves DeepSpeed's cached groups pointing at the dead world: the next recipe still sets up and
    trains, both when it makes the group itself and when it finds one someone else made."""
    import torch.distributed as dist

    from phantom_ray.train.recipe import ensure_distributed

    cfg = tiny_cfg(tmp_path, recipe={"step": 2})
    _recipe(cfg, total_steps=1)
    dist.destroy_process_group()
    rec = _recipe(cfg, total_steps=1)          # the recipe makes the new group
    rec.train_epoch(batches[:1])
    assert rec.state.step == 1
    dist.destroy_process_group()
    os.environ.pop("MASTER_PORT", None)
    ensure_distributed()                       # someone else makes it
    rec = _recipe(cfg, total_steps=1)
    rec.train_epoch(batches[:1])
    assert rec.state.step == 1


def test_save_resume_continues_identically_and_export_loads(tmp_path, batches):
    from phantom_ray.model import PhantomForCausalLM
    from phantom_ray.processing import load_tokenizer

    cfg = tiny_cfg(tmp_path, recipe={"step": 2}, optim={"warmup_steps": 1})
    ref = _recipe(cfg)
    losses_ref = []
    ref.train_epoch(batches, on_step=lambda r, m: losses_ref.append(m["loss"]))

    a = _recipe(cfg)
    a.train_epoch(batches[:1])
    ckpt = str(tmp_path / "ckpt")
    a.save(ckpt)
    b = _recipe(cfg)
    state = b.resume(ckpt)
    assert state.step == 1 and state.consumed == batches[0]["sample_id"]
    assert b.scheduler.get_last_lr() == a.scheduler.get_last_lr()
    losses = []
    b.train_epoch(batches[1:], on_step=lambda r, m: losses.append(m["loss"]))
    assert losses == pytest.approx(losses_ref[1:], rel=1e-5, abs=1e-6)

    out = b.export(str(tmp_path / "export"))
    loaded = PhantomForCausalLM.from_pretrained(out)
    for n, p in b.model.named_parameters():
        assert torch.equal(dict(loaded.named_parameters())[n], p.detach()), n
    tok = load_tokenizer(out)
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == loaded.config.image_token_index
    from phantom_ray.processing import chat_template

    assert tok.chat_template == chat_template(loaded.config.template)  # the export builds Phantom's prompt
    batch = batches[0]
    gen = loaded.generate(batch["input_ids"][:2], batch["attention_mask"][:2], batch["pixel_values"][:2], max_new_tokens=4)
    assert gen.sequences.shape[0] == 2
    assert os.path.exists(os.path.join(out, "train_config.yaml"))


def test_dpo_reference_pass_scores_processed_rows(tmp_path):
    """The Ray Data reference pass (called here directly on a processed pyarrow batch) gives the
    reference model's answer log-probs, and the collate hands them to the loss."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from phantom_ray.data.pack import pack
    from phantom_ray.data.pipeline import DataConfig, default_processor_factory, process_row, processed_schema
    from phantom_ray.data.synth import LAYOUT_FILES, synthesize
    from phantom_ray.model import PhantomForCausalLM
    from phantom_ray.train.ray_trainer import CollateWithKeys, ReferenceScorer

    synthesize(str(tmp_path / "src"), num_samples=6, layout="triples", image_size=32, heldout_fraction=0.0)
    pack(str(tmp_path / "src" / LAYOUT_FILES["triples"]), "triples", str(tmp_path / "packed"), executor="local")
    rows = pq.read_table(next((tmp_path / "packed" / "shards").glob("*.parquet"))).to_pylist()
    proc = default_processor_factory("tiny-qwen2")
    table = pa.Table.from_pylist([process_row({**r, "repeat": 0}, proc, "po") for r in rows], schema=processed_schema("po"))
    ref_dir = str(tmp_path / "ref")
    ref = PhantomForCausalLM.from_preset("tiny-qwen2", seed=5)
    ref.save_pretrained(ref_dir)
    from phantom_ray.processing import load_tokenizer

    load_tokenizer("tiny-qwen2", ref.config).save_pretrained(ref_dir)  # a checkpoint carries its tokenizer
    data = DataConfig(shards=str(tmp_path / "packed"), task="po")
    scored = ReferenceScorer(ref_dir, "tiny-qwen2", data.to_dict())(table)
    cols = {n: scored.column(n).to_numpy(zero_copy_only=False) for n in scored.column_names}
    batch = CollateWithKeys(proc, data)(cols)
    assert batch["ref_chosen_logps"].shape == (len(rows),) and batch["sample_key"][0].endswith("#0")
    with torch.no_grad():
        out = ref(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], image_repeat=2,
                  phantom_index=batch["phantom_index"])
    lp, _ = sequence_logps(out.logits, batch["labels"])
    n = len(rows)
    assert torch.allclose(batch["ref_chosen_logps"], lp[:n], atol=1e-4)
    assert torch.allclose(batch["ref_rejected_logps"], lp[n:], atol=1e-4)
    # policy == reference: every DPO margin is 0
    res = preference_loss(out.logits, batch["labels"], kind="dpo", beta=0.5, has_rejected=torch.ones(n, dtype=torch.bool),
                          ref_chosen_logps=batch["ref_chosen_logps"], ref_rejected_logps=batch["ref_rejected_logps"])
    assert res.reward_margin.abs().item() < 1e-3


def test_cli_verb_and_job_script_share_arguments(capsys):
    import importlib.util

    from phantom_ray.cli import main

    tiny = str(__import__("pathlib").Path(__file__).parents[1] / "configs" / "train" / "tiny-cpu.yaml")
    assert main(["train", "--config", tiny, "--dry-run", "optim.lr=1e-3", "run.max_steps=3"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.001" in printed and "max_steps: 3" in printed
    path = __import__("pathlib").Path(__file__).parents[1] / "jobs" / "train.py"
    spec = importlib.util.spec_from_file_location("_job_train", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert "ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml" in " ".join(job.__doc__.split())
    args = job.build_parser().parse_args(["--config", tiny, "optim.lr=1e-3"])
    assert args.config == tiny and args.overrides == ["optim.lr=1e-3"]
    with pytest.raises(ValueError, match="optim.lrr"):
        job.main(["--config", tiny, "--dry-run", "optim.lrr=1"])


def test_activation_checkpointing_gives_the_same_step(tmp_path, batches):
    plain, ckpt = [], []
    _recipe(tiny_cfg(tmp_path, recipe={"step": 2})).train_epoch(batches[:2], on_step=lambda r, m: plain.append(m["loss"]))
    rec = _recipe(tiny_cfg(tmp_path, recipe={"step": 2}, model={"gradient_checkpointing": True}))
    assert rec.model.gradient_checkpointing
    rec.train_epoch(batches[:2], on_step=lambda r, m: ckpt.append(m["loss"]))
    assert ckpt == pytest.approx(plain, rel=1e-5)


def test_step2_starts_from_step1_export(tmp_path, batches):
    step1 = _recipe(tiny_cfg(tmp_path, recipe={"step": 1}, optim={"eps": 1e-30}))
    step1.train_epoch(batches[:1])
    export = step1.export(str(tmp_path / "step1-export"))
    cfg2 = tiny_cfg(tmp_path, recipe={"step": 2}, model={"init_from": export})
    assert cfg2.data.model == export  # the processor follows the model section
    step2 = _recipe(cfg2)
    trained = dict(step1.model.named_parameters())
    for n, p in step2.model.named_parameters():
        assert torch.equal(p, trained[n]), n
        assert p.requires_grad, n
    step2.train_epoch(batches[1:2])
    assert step2.state.step == 1


# ---- packing and LoRA in the recipe ----------------------------------------------------------------------

def test_packed_batch_gives_the_padded_batch_loss(tmp_path):
    """The recipe's loss on a packed PO batch equals its loss on the same pairs padded."""
    proc = tiny_processor("tiny-qwen2", max_length=256)
    pairs = po_pairs(proc, 4, seed=2)
    rec = _recipe(tiny_cfg(tmp_path, recipe={"step": 2}, loss={"chunk_tokens": 7}))
    padded, packed = proc.collate_pairs(pairs), proc.pack_pairs(pairs, 400)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    with torch.no_grad():
        a, b = rec.forward_loss(padded).metrics(), rec.forward_loss(packed).metrics()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("merge", [True, False])
def test_lora_step2_trains_adapters_and_exports(tmp_path, batches, merge):
    pytest.importorskip("peft")
    from phantom_ray.model import PhantomForCausalLM
    from phantom_ray.train.lora import load_with_adapter

    cfg = tiny_cfg(tmp_path, recipe={"step": 2, "lora": {"enabled": True, "r": 4, "vision": True,
                                                          "merge_on_export": merge}}, optim={"lr": 5e-2})
    rec = _recipe(cfg)
    names = rec.trainable_names
    assert any("language_model" in n and "lora_A" in n for n in names)
    assert any("vision_model" in n and "lora_B" in n for n in names)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in names)  # base weights frozen
    assert any("_phantom" in n for n in names)
    rec.train_epoch(batches[:2])
    sd = {n: p for n, p in rec.model.named_parameters()}
    assert any(float(p.detach().abs().sum()) > 0 for n, p in sd.items() if "lora_B" in n)  # adapters moved off zero
    batch = batches[2]
    rec.engine.eval()
    with torch.no_grad():
        want = rec.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                         image_repeat=2).logits
    export = rec.export(str(tmp_path / "export"))
    exported = os.listdir(export)
    if merge:
        assert "adapter_config.json" not in exported
        model = PhantomForCausalLM.from_pretrained(export).eval()
    else:
        assert "adapter_model.safetensors" in exported
        model = load_with_adapter(export)
    with torch.no_grad():
        got = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], image_repeat=2).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
