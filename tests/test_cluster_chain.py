"""The shipped configs chain: model init -> pack -> step 1 -> step 2 -> eval / caption / serve.

Read from the shipped files themselves (the RayJobs' arguments, the training and eval configs loaded
into their dataclasses, the Serve configs including the RayService's, the `model init` commands in
the step-1 configs' comments): step 1 starts from what `model init` writes, step 2 from step 1's
export, and serving, captioning and eval read step 2's export; every `s3://` a step reads was written
by an earlier step or is declared as the user's input in docs/cluster.md; one bucket naming scheme
everywhere, and the IAM scope (docs/cluster.md's policy, the ServiceAccount, the launcher's instance
profiles) covers every bucket used. Parsing only, no Ray, no S3.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

import pytest

import cluster_files as cf

SIZES = ["phantom-0.5b", "phantom-1.8b", "phantom-3.8b", "phantom-7b"]
INIT_COMMAND = re.compile(r"phantom-ray model init (--size \S+ --source \S+ --output \S+)")


def _norm(uri: str) -> str:
    return uri.rstrip("/")


@dataclass
class Step:
    name: str
    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)


def _train_config(path):
    from phantom_ray.train.config import TrainConfig

    return TrainConfig.from_yaml(path)


def _eval_config(path):
    from phantom_ray.eval.config import EvalConfig

    return EvalConfig.from_yaml(path)


def _init_commands() -> dict[str, list[str]]:
    """preset -> the `model init` arguments written in its step-1 config's comment."""
    out = {}
    for p in sorted(cf.TRAIN_DIR.glob("phantom-*-step1.yaml")):
        found = INIT_COMMAND.findall(p.read_text())
        assert len(found) == 1, f"{p.name}: its comment must give the one `phantom-ray model init` command, found {found}"
        argv = shlex.split(found[0])
        out[cf.option_value(argv, "--size")] = argv
    return out


def _chain() -> list[Step]:
    """The steps in the order a user runs them, with what each reads and writes (s3:// only)."""
    steps: list[Step] = []
    for size, argv in sorted(_init_commands().items()):
        steps.append(Step(f"model init {size}", writes=[cf.option_value(argv, "--output")]))
    init = cf.rayjob_argv("rayjob-init.yaml")
    steps.append(Step("rayjob-init.yaml", writes=[cf.option_value(init, "--output")]))
    pack = cf.rayjob_argv("rayjob-pack.yaml")
    steps.append(Step("rayjob-pack.yaml", reads=[cf.option_value(pack, "--input")],
                      writes=[cf.option_value(pack, "--output")]))
    for step in (1, 2):
        for p in sorted(cf.TRAIN_DIR.glob(f"phantom-*-step{step}.yaml")):
            cfg = _train_config(p)
            steps.append(Step(p.name, reads=[*cfg.data.shards, cfg.model.init_from],
                              writes=[cfg.run.run_dir(), cfg.run.export_uri()]))
    for p in sorted(cf.EVAL_DIR.glob("*.yaml")):
        cfg = _eval_config(p)
        steps.append(Step(p.name, reads=[cfg.model, cfg.data_root], writes=[cfg.output]))
    cap = cf.rayjob_argv("rayjob-caption.yaml")
    steps.append(Step("rayjob-caption.yaml", reads=[cf.option_value(cap, "--model"), cf.option_value(cap, "--input")],
                      writes=[cf.option_value(cap, "--output")]))
    for where, config in cf.serve_configs():
        reads = [m["checkpoint"] for app in config["applications"] for m in (app.get("args") or {}).get("models", [])]
        steps.append(Step(where, reads=reads))
    for s in steps:
        s.reads = [_norm(u) for u in s.reads if u and u.startswith("s3://")]
        s.writes = [_norm(u) for u in s.writes if u and u.startswith("s3://")]
    return steps


def _user_inputs() -> list[str]:
    """The prefixes docs/cluster.md's storage table names as the user's input."""
    text = cf.CLUSTER_DOC.read_text()
    bucket = _bucket_of_doc(text)
    prefixes = []
    for first, second in re.findall(r"^\| `([\w./<>-]+)` \| ([^|]+)\|", text, re.M):
        if second.strip().startswith("your input"):
            prefixes.append(f"{bucket}/{first.split('<')[0].rstrip('/')}")
    return prefixes


def _bucket_of_doc(text: str) -> str:
    m = re.search(r"One bucket, `(s3://[\w.-]+)`", text)
    assert m, "docs/cluster.md: the storage section names its bucket (One bucket, `s3://...`)"
    return m.group(1)


def _train(name: str):
    return _train_config(cf.TRAIN_DIR / name)


def test_every_read_is_written_by_an_earlier_step_or_is_the_users_input():
    inputs = _user_inputs()
    assert inputs, "docs/cluster.md declares no user input"
    written: list[str] = []
    problems = []
    for step in _chain():
        for uri in step.reads:
            if uri in written or any(uri == p or uri.startswith(p + "/") for p in inputs):
                continue
            problems.append(f"{step.name} reads {uri}, which no earlier step writes and docs/cluster.md "
                            f"does not name as your input")
        written += step.writes
    assert not problems, "\n".join(problems)


def test_user_inputs_are_read_only():
    inputs = _user_inputs()
    for step in _chain():
        for uri in step.writes:
            assert not any(uri == p or uri.startswith(p + "/") for p in inputs), (
                f"{step.name} writes {uri}, under a prefix docs/cluster.md calls your input")


@pytest.mark.parametrize("size", SIZES)
def test_step1_starts_from_model_init_and_step2_from_step1(size):
    step1, step2 = _train(f"{size}-step1.yaml"), _train(f"{size}-step2.yaml")
    assert step1.model.preset == step2.model.preset == size
    init = _init_commands()[size]
    assert cf.option_value(init, "--size") == size
    assert step1.model.init_from == cf.option_value(init, "--output"), (
        f"{size}-step1.yaml: model.init_from {step1.model.init_from} is not where its `model init` command writes")
    assert step1.recipe.step == 1 and step2.recipe.step == 2
    assert step2.model.init_from == step1.run.export_uri(), (
        f"{size}-step2.yaml: model.init_from {step2.model.init_from} is not step 1's export {step1.run.export_uri()}")
    assert step1.data.shards == step2.data.shards


def test_the_init_rayjob_is_the_7b_configs_command():
    job = cf.rayjob_argv("rayjob-init.yaml")
    assert job[:2] == ["python", "jobs/init.py"]
    assert job[2:] == _init_commands()["phantom-7b"], "rayjob-init.yaml and phantom-7b-step1.yaml's comment differ"


def test_training_reads_what_pack_writes():
    pack_out = _norm(cf.option_value(cf.rayjob_argv("rayjob-pack.yaml"), "--output"))
    for p in sorted(cf.TRAIN_DIR.glob("phantom-*.yaml")):
        assert [_norm(s) for s in _train_config(p).data.shards] == [pack_out], f"{p.name}: data.shards"


def test_serving_captioning_and_eval_read_step2_exports():
    exports = {size: _norm(_train(f"{size}-step2.yaml").run.export_uri()) for size in SIZES}
    for where, config in cf.serve_configs():
        if where == "serve/local-cpu.yaml":
            continue  # tiny presets on a laptop
        for app in config["applications"]:
            for m in app["args"]["models"]:
                assert _norm(m["checkpoint"]) == exports[m["name"]], (
                    f"{where}: {m['name']} serves {m['checkpoint']}, not step 2's export {exports[m['name']]}")
    cap = cf.rayjob_argv("rayjob-caption.yaml")
    assert _norm(cf.option_value(cap, "--model")) in exports.values()
    for p in sorted(cf.EVAL_DIR.glob("*.yaml")):
        cfg = _eval_config(p)
        assert _norm(cfg.model) == exports[f"phantom-{cfg.paper_size}"], f"{p.name}: model is not step 2's export"
    (eval_job,) = [cf.option_value(cf.rayjob_argv("rayjob-eval.yaml"), "--config")]
    assert (cf.REPO / eval_job).is_file()


def _shipped_text_files():
    paths = [cf.REPO / "README.md", cf.CLUSTER_DOC]
    for d in ("configs", "serve", "cluster", "jobs"):
        paths += [p for p in (cf.REPO / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return paths


def _buckets_used() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in _shipped_text_files():
        for bucket in re.findall(r"s3://([a-z0-9][a-z0-9.-]{2,62})(?=[/\s`'\")]|$)", p.read_text(), re.M):
            out.setdefault(bucket, []).append(str(p.relative_to(cf.REPO)))
    return out


def test_one_bucket_naming_scheme_everywhere():
    used = _buckets_used()
    bucket = _bucket_of_doc(cf.CLUSTER_DOC.read_text()).removeprefix("s3://")
    others = {b: sorted(set(files)) for b, files in used.items() if b != bucket}
    assert not others, f"buckets other than {bucket} (docs/cluster.md): {others}"
    # every prefix a shipped config or manifest uses is one of docs/cluster.md's table
    text = cf.CLUSTER_DOC.read_text()
    prefixes = {f.split("/")[0] for f in re.findall(r"^\| `([\w./<>-]+)` \|", text, re.M)}
    for p in _shipped_text_files():
        for prefix in re.findall(rf"s3://{re.escape(bucket)}/([\w.-]+)", p.read_text()):
            assert prefix in prefixes, f"{p.relative_to(cf.REPO)}: s3://{bucket}/{prefix}/ is not in docs/cluster.md's table"


def test_iam_scope_covers_every_bucket_used():
    text = cf.CLUSTER_DOC.read_text()
    (policy_text,) = re.findall(r"```json\n(.*?)```", text, re.S)
    policy = json.loads(policy_text)
    resources = {r for st in policy["Statement"] for r in st["Resource"]}
    actions = {a for st in policy["Statement"] for a in st["Action"]}
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject"} <= actions
    sa_comment = "\n".join(l for l in (cf.KUBERAY / "serviceaccount.yaml").read_text().splitlines() if l.startswith("#"))
    for bucket in _buckets_used():
        assert f"arn:aws:s3:::{bucket}" in resources and f"arn:aws:s3:::{bucket}/*" in resources, (
            f"docs/cluster.md's policy does not cover {bucket}")
        assert f"s3://{bucket}" in sa_comment, f"serviceaccount.yaml's comment does not name s3://{bucket}"
    sa = cf.manifest("serviceaccount.yaml")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    launcher = cf.load_yaml(cf.LAUNCHER)
    for name, node in launcher["available_node_types"].items():
        profile = node["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Arn", "").startswith("arn:aws:iam::"), (
            f"aws-gpu-cluster.yaml: node type {name} has no IamInstanceProfile: no credentials for the bucket")


def test_docs_give_the_commands_from_an_empty_bucket():
    text = cf.CLUSTER_DOC.read_text()
    for name, _ in cf.rayjobs():
        assert f"cluster/kuberay/{name}" in text, f"docs/cluster.md does not run {name}"
    for needed in ("rayservice.yaml", "serve deploy", "ray up", "docker build", "jobs/init.py"):
        assert needed in text
    # the launcher path runs each RayJob's entrypoint unchanged
    for name, _ in cf.rayjobs():
        entry = " ".join(cf.rayjob_argv(name))
        if name == "rayjob-train.yaml":
            continue  # step 1 and step 2 both appear
        assert entry in re.sub(r"\s*\\\n\s*", " ", text), f"docs/cluster.md: `{entry}` ({name}) is not in the launcher path"
