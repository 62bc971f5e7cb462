"""Validation of the cluster files: the Ray cluster launcher config, the KubeRay manifests, the Serve
configs, the cluster image and the job runtime environment.

Each file is checked against the schema that ships inside the installed ``ray`` package (the
launcher's ``ray/autoscaler/ray-schema.json``, Ray Serve's ``ServeDeploySchema``, ``RuntimeEnv``),
and the files are checked against each other: the KubeRay GPU worker groups ask for what the
launcher's 8x H100 group provides, the RayService embeds the application of
``serve/gpu-cluster.yaml``, every RayJob entrypoint names a script in ``jobs/`` whose own parser
accepts the arguments, and every image runs the Ray version the Dockerfile builds.
No network, no cluster: pure parsing, a few seconds in all.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "cluster" / "aws-gpu-cluster.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
KUBERAY = REPO / "cluster" / "kuberay"
SERVE_GPU = REPO / "serve" / "gpu-cluster.yaml"
RUNTIME_ENV = REPO / "jobs" / "runtime_env.yaml"
ARCHITECTURE = REPO / "docs" / "architecture.md"

GPU_GROUP = "gpu-8xh100"
# RayJobs whose work needs no GPU (model init converts on a CPU pod, packing runs CPU tasks)
CPU_ONLY = {"rayjob-init.yaml", "rayjob-pack.yaml"}
CPU_GROUP = "cpu-packing"
SERVE_SIZES = ["phantom-0.5b", "phantom-1.8b", "phantom-3.8b", "phantom-7b"]

# file -> (apiVersion, kind): one concern per file
KUBERAY_KINDS = {
    "serviceaccount.yaml": ("v1", "ServiceAccount"),
    "raycluster.yaml": ("ray.io/v1", "RayCluster"),
    "rayjob-init.yaml": ("ray.io/v1", "RayJob"),
    "rayjob-pack.yaml": ("ray.io/v1", "RayJob"),
    "rayjob-train.yaml": ("ray.io/v1", "RayJob"),
    "rayjob-eval.yaml": ("ray.io/v1", "RayJob"),
    "rayjob-caption.yaml": ("ray.io/v1", "RayJob"),
    "rayservice.yaml": ("ray.io/v1", "RayService"),
}



def _load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def _manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected exactly one document (one concern per file), got {len(docs)}"
    return docs[0]


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec in the KubeRay manifests, wherever it is embedded."""
    specs = []
    for name, (_, kind) in KUBERAY_KINDS.items():
        doc = _manifest(name)
        if kind == "RayCluster":
            specs.append((name, doc["spec"]))
        elif kind == "RayJob":
            specs.append((name, doc["spec"]["rayClusterSpec"]))
        elif kind == "RayService":
            specs.append((name, doc["spec"]["rayClusterConfig"]))
    return specs


def _rayjobs() -> list[tuple[str, dict]]:
    return [(n, _manifest(n)) for n, (_, kind) in KUBERAY_KINDS.items() if kind == "RayJob"]


def _dockerfile() -> dict:
    text = DOCKERFILE.read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M)
    workdir = re.findall(r"^WORKDIR (\S+)$", text, re.M)
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M)
    return {
        "text": text,
        "ray_version": ray_version.group(1) if ray_version else None,
        "workdir": workdir[-1] if workdir else None,
        "copy_sources": [src for line in copies for src in line.split()],
    }


def _later_case(rel: str, *values, id: str | None = None):
    return pytest.param(*values, id=id or rel)


def _gpus(resources: dict) -> int:
    return int(resources.get("nvidia.com/gpu", 0))


# --------------------------------------------------------------------------------------------------
# Every file says what it runs and how to apply it


HEADER_COMMANDS = {
    "cluster/aws-gpu-cluster.yaml": "ray up",
    "cluster/Dockerfile": "docker build",
    "cluster/Dockerfile.dockerignore": "docker build",
    "serve/gpu-cluster.yaml": "serve deploy",
    "jobs/runtime_env.yaml": "ray job submit",
    **{f"cluster/kuberay/{n}": "kubectl apply" for n in KUBERAY_KINDS},
}


def test_every_cluster_file_is_covered_here():
    on_disk = {str(p.relative_to(REPO)) for p in (REPO / "cluster").rglob("*") if p.is_file()}
    on_disk = {p for p in on_disk if "__pycache__" not in p}
    assert on_disk <= set(HEADER_COMMANDS), f"cluster files without a check: {sorted(on_disk - set(HEADER_COMMANDS))}"


@pytest.mark.parametrize("rel", sorted(HEADER_COMMANDS))
def test_file_starts_with_comment_saying_how_to_apply_it(rel):
    lines = (REPO / rel).read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{rel}: must start with a comment saying what it runs and how to apply it"
    assert any(HEADER_COMMANDS[rel] in line for line in header), (
        f"{rel}: the opening comment should show the `{HEADER_COMMANDS[rel]}` command that applies it"
    )


# --------------------------------------------------------------------------------------------------
# Ray cluster launcher config


def _ray_cluster_schema() -> dict:
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def test_launcher_config_matches_ray_cluster_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load_yaml(LAUNCHER)
    jsonschema.validate(config, _ray_cluster_schema())
    # what `ray up` does before launching anything: merge the AWS defaults, then validate again
    # (also checks head_node_type and the min_workers sum against max_workers)
    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_cluster_schema_rejects_a_misspelt_field():
    # proves the schema check above has teeth: node types forbid unknown keys
    config = _load_yaml(LAUNCHER)
    config["available_node_types"][GPU_GROUP]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, _ray_cluster_schema())


def test_launcher_groups_head_8xh100_and_cpu():
    config = _load_yaml(LAUNCHER)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must not take tasks (resources: {CPU: 0})"
    assert head["resources"].get("GPU", 0) == 0

    gpu = types[GPU_GROUP]
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge"
    assert gpu["resources"]["GPU"] == 8, "p5.48xlarge has 8 H100s"
    assert gpu["resources"]["CPU"] <= 192, "p5.48xlarge has 192 vCPUs"

    cpu = types[CPU_GROUP]
    assert cpu["resources"].get("GPU", 0) == 0
    assert cpu["resources"]["CPU"] > 0

    for name in (GPU_GROUP, CPU_GROUP):
        bounds = types[name]
        assert 0 <= bounds["min_workers"] <= bounds["max_workers"], f"{name}: autoscaling bounds"
    assert sum(types[n]["max_workers"] for n in (GPU_GROUP, CPU_GROUP)) <= config["max_workers"]
    assert config["docker"]["image"], "every node runs the image built from cluster/Dockerfile"
    assert config["setup_commands"], "setup commands check the image"


# --------------------------------------------------------------------------------------------------
# Serve configs


def _unknown_keys(model, data, where: str) -> list[str]:
    """Keys of ``data`` that the pydantic ``model`` instance it validated into does not declare.

    Ray Serve's schema ignores unknown keys, so a misspelt ``max_replica`` would be dropped silently.
    """
    from pydantic import BaseModel

    found = []
    fields = type(model).model_fields
    for key, value in data.items():
        if key not in fields:
            found.append(f"{where}.{key}")
            continue
        attr = getattr(model, key)
        if isinstance(attr, BaseModel) and isinstance(value, dict):
            found += _unknown_keys(attr, value, f"{where}.{key}")
        elif isinstance(attr, list) and isinstance(value, list):
            for i, (a, v) in enumerate(zip(attr, value)):
                if isinstance(a, BaseModel) and isinstance(v, dict):
                    found += _unknown_keys(a, v, f"{where}.{key}[{i}]")
    return found


def _validate_serve_config(config: dict, where: str):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    unknown = _unknown_keys(schema, config, where)
    assert not unknown, f"fields Ray Serve does not know (misspelt?): {unknown}"
    return schema


def _rayservice_serve_config() -> dict:
    return yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])


def _serve_cases():
    cases = [pytest.param(p, id=str(p.relative_to(REPO))) for p in sorted((REPO / "serve").glob("*.yaml"))]
    cases.append(pytest.param("rayservice", id="cluster/kuberay/rayservice.yaml:serveConfigV2"))
    return cases


@pytest.mark.parametrize("source", _serve_cases())
def test_serve_config_matches_ray_serve_schema(source):
    if source == "rayservice":
        config, where = _rayservice_serve_config(), "rayservice.serveConfigV2"
    else:
        config, where = _load_yaml(source), source.name
    schema = _validate_serve_config(config, where)
    assert schema.applications, f"{where}: no application"
    for app in schema.applications:
        assert re.fullmatch(r"[\w.]+:\w+", app.import_path), f"{where}: import_path {app.import_path!r}"


def test_unknown_key_check_catches_a_misspelt_serve_field():
    config = _load_yaml(SERVE_GPU)
    config["applications"][0]["route_prefx"] = "/"
    config["http_options"]["request_timeout"] = 300
    with pytest.raises(AssertionError, match=r"route_prefx.*request_timeout|request_timeout.*route_prefx"):
        _validate_serve_config(config, "edited")


def test_rayservice_embeds_the_same_application_as_the_serve_file():
    assert _rayservice_serve_config()["applications"] == _load_yaml(SERVE_GPU)["applications"]


def test_gpu_serve_app_hosts_four_sizes_on_the_8xh100_group():
    from ray.serve.config import AutoscalingConfig

    from phantom_ray.model.config import PRESETS

    (app,) = _load_yaml(SERVE_GPU)["applications"]
    assert app["import_path"] == "phantom_ray.serving.app:build_app"
    args = app["args"]
    assert args["api_keys_env"] == "PHANTOM_API_KEYS"
    assert isinstance(args["allowed_image_url_prefixes"], list)
    models = {m["name"]: m for m in args["models"]}
    assert sorted(models) == sorted(SERVE_SIZES)

    launcher = _load_yaml(LAUNCHER)["available_node_types"][GPU_GROUP]
    gpus_per_node = launcher["resources"]["GPU"]
    max_gpus = 0.0
    for name, m in models.items():
        assert name in PRESETS, f"{name}: not a PhantomConfig preset"
        assert m["checkpoint"].startswith("s3://"), f"{name}: checkpoint must be an S3 URI"
        assert m["dtype"] in ("bfloat16", "float16", "float32")
        assert m["attn_implementation"] in ("eager", "sdpa", "flash")
        assert 0 < m["num_gpus"] <= 1, f"{name}: one replica fits on one H100"
        # fractional replicas must tile a GPU exactly, or the remainder is stranded
        assert (1 / m["num_gpus"]).is_integer(), f"{name}: num_gpus={m['num_gpus']} does not divide a GPU"
        if m.get("engine") == "vllm":  # continuous batching: vLLM's own concurrency settings, never the torch ones
            assert "max_batch_size" not in m and "batch_wait_timeout_s" not in m, name
            assert m.get("max_num_seqs", 1) >= 1 and m.get("max_num_batched_tokens", 1) >= 1
        else:
            assert 0 < m["max_batch_size"] <= m["max_ongoing_requests"]
            assert 0 < m["batch_wait_timeout_s"] < 1
        scaling = AutoscalingConfig(**m["autoscaling_config"])  # Ray's own validation
        assert 1 <= scaling.min_replicas <= scaling.max_replicas
        max_gpus += m["num_gpus"] * scaling.max_replicas
    assert models["phantom-0.5b"]["num_gpus"] < 1 and models["phantom-1.8b"]["num_gpus"] < 1, (
        "the small sizes share GPUs"
    )
    # every model at its max replicas fits the GPU group at its max size, on both launchers
    assert max_gpus <= gpus_per_node * launcher["max_workers"]
    (group,) = [g for g in _manifest("rayservice.yaml")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                if g["groupName"] == GPU_GROUP]
    assert max_gpus <= gpus_per_node * group["maxReplicas"]


# --------------------------------------------------------------------------------------------------
# KubeRay manifests


@pytest.mark.parametrize("name", sorted(KUBERAY_KINDS))
def test_kuberay_manifest_parses_with_expected_kind(name):
    doc = _manifest(name)
    assert (doc["apiVersion"], doc["kind"]) == KUBERAY_KINDS[name]
    assert doc["metadata"]["name"]


def test_every_kuberay_file_is_covered_here():
    assert {p.name for p in KUBERAY.glob("*.yaml")} == set(KUBERAY_KINDS)


def test_kuberay_clusters_run_the_dockerfile_ray_version_and_the_launcher_image():
    from packaging.requirements import Requirement

    ray_version = _dockerfile()["ray_version"]
    assert ray_version, "cluster/Dockerfile: no ARG RAY_VERSION=..."
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (ray_req,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "ray"]
    assert ray_req.specifier.contains(ray_version), f"image ray {ray_version} outside pyproject's {ray_req}"

    image = _load_yaml(LAUNCHER)["docker"]["image"]
    for name, spec in _ray_cluster_specs():
        assert spec["rayVersion"] == ray_version, f"{name}: rayVersion != cluster/Dockerfile RAY_VERSION"
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for container in pod["spec"]["containers"]:
                assert container["image"] == image, f"{name}: {container['name']} runs another image"
            assert pod["spec"]["serviceAccountName"] == _manifest("serviceaccount.yaml")["metadata"]["name"]


def test_kuberay_worker_groups_match_the_launcher_groups():
    launcher = _load_yaml(LAUNCHER)["available_node_types"]
    for name, spec in _ray_cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True, f"{name}: autoscaling off"
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", (
            f"{name}: head takes tasks, unlike the launcher's head (CPU: 0)"
        )
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        if name not in CPU_ONLY:
            assert GPU_GROUP in groups, f"{name}: no {GPU_GROUP} group"
        else:
            assert GPU_GROUP not in groups, f"{name}: a CPU-only job with a GPU group"
        assert set(groups) <= set(launcher), f"{name}: groups the launcher config lacks: {set(groups) - set(launcher)}"
        for group_name, group in groups.items():
            node = launcher[group_name]
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{name}/{group_name}"
            assert group["maxReplicas"] <= node["max_workers"], f"{name}/{group_name}: more pods than the launcher allows nodes"
            pod = group["template"]["spec"]
            assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == node["node_config"]["InstanceType"]
            (container,) = pod["containers"]
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert _gpus(limits) == _gpus(requests) == node["resources"].get("GPU", 0), (
                f"{name}/{group_name}: nvidia.com/gpu {limits.get('nvidia.com/gpu')} per pod, "
                f"launcher node has {node['resources'].get('GPU', 0)}"
            )
            assert int(limits["cpu"]) <= node["resources"]["CPU"], f"{name}/{group_name}: more CPUs than a node has"


def _entrypoint_cases():
    cases = []
    for name, doc in _rayjobs():
        argv = shlex.split(doc["spec"]["entrypoint"])
        script = argv[1] if len(argv) > 1 else ""
        cases.append(_later_case(script, name, argv, id=f"{name}:{script}"))
    return cases


@pytest.mark.parametrize("name,argv", _entrypoint_cases())
def test_rayjob_entrypoint_names_a_job_script_that_exists(name, argv):
    assert argv[0] == "python" and len(argv) > 1, f"{name}: entrypoint must be `python jobs/<verb>.py ...`"
    assert argv[1].startswith("jobs/") and argv[1].endswith(".py"), f"{name}: {argv[1]} is not under jobs/"
    assert (REPO / argv[1]).is_file(), f"{name}: entrypoint script {argv[1]} does not exist"


@pytest.mark.parametrize("name,argv", _entrypoint_cases())
def test_rayjob_arguments_parse_with_the_job_script_parser(name, argv):
    path = REPO / argv[1]
    spec = importlib.util.spec_from_file_location(f"_job_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "build_parser"), (
        f"{argv[1]} must expose build_parser() so that {name}'s arguments can be checked here"
    )
    module.build_parser().parse_args(argv[2:])  # SystemExit (a failure) on an unknown/missing option


def _config_cases():
    cases = []
    for name, doc in _rayjobs():
        argv = shlex.split(doc["spec"]["entrypoint"])
        configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
        if name == "rayjob-train.yaml":
            # the file's comment runs step 2 by substituting step1 -> step2
            configs += [c.replace("step1", "step2") for c in configs if "step1" in c]
        cases += [_later_case(c, name, argv[1], c, id=f"{name}:{c}") for c in configs]
    return cases


def _config_loader(script: str):
    """The typed config class the job script loads its --config into."""
    if script == "jobs/train.py":
        from phantom_ray.train.config import TrainConfig

        return TrainConfig.from_yaml
    if script == "jobs/eval.py":
        from phantom_ray.eval.config import EvalConfig

        return EvalConfig.from_yaml
    raise AssertionError(f"{script}: takes --config, but this test knows no config class for it")


@pytest.mark.parametrize("name,script,config", _config_cases())
def test_rayjob_config_file_exists_and_loads_into_its_dataclass(name, script, config):
    path = REPO / config
    assert path.is_file(), f"{name}: --config {config} does not exist"
    loaded = _config_loader(script)(path)
    assert loaded is not None, f"{config}: loader returned nothing"


def test_rayjob_runtime_env_uploads_the_image_repository_copy():
    from ray.runtime_env import RuntimeEnv

    workdir = _dockerfile()["workdir"]
    for name, doc in _rayjobs():
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert env["working_dir"] == workdir, f"{name}: working_dir is not the Dockerfile WORKDIR {workdir}"
        # that directory is a copy of this repository; validate the rest with Ray's own class
        RuntimeEnv(**{**env, "working_dir": str(REPO)})
        assert doc["spec"]["shutdownAfterJobFinishes"] is True, f"{name}: its cluster would outlive the job"


# --------------------------------------------------------------------------------------------------
# Cluster image and job runtime env


def _dockerfile_cases():
    return [_later_case(src, src) for src in _dockerfile()["copy_sources"]]


@pytest.mark.parametrize("src", _dockerfile_cases())
def test_dockerfile_copies_paths_that_exist(src):
    assert (REPO / src).exists(), f"cluster/Dockerfile copies {src}, which is not in the repository"


def test_job_runtime_env_is_valid_and_installs_the_project_requirements():
    from packaging.requirements import Requirement
    from ray.runtime_env import RuntimeEnv

    env = _load_yaml(RUNTIME_ENV)
    cwd = os.getcwd()
    os.chdir(REPO)  # working_dir "." is resolved against the directory `ray job submit` runs in
    try:
        RuntimeEnv(**env)
    finally:
        os.chdir(cwd)
    assert env["working_dir"] == "."
    assert ".venv" in env["excludes"] and ".git" in env["excludes"]

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["train"]]
    # torch and ray come from the cluster image: a runtime env must never reinstall them
    wanted = {r.name.lower(): str(r.specifier) for r in wanted if r.name.lower() not in ("torch", "ray")}
    got = {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in env["pip"]["packages"]}
    diff = sorted(set(got.items()) ^ set(wanted.items()))
    assert got == wanted, f"jobs/runtime_env.yaml pip list differs from pyproject.toml: {diff}"


def test_architecture_doc_has_a_mermaid_diagram_and_names_files_that_exist():
    text = ARCHITECTURE.read_text()
    assert "```mermaid" in text
    for stage in ("S3", "Ray Data", "Ray Train", "DeepSpeed", "Ray Serve", "actor pool", "export"):
        assert stage in text, f"docs/architecture.md: the diagram misses {stage!r}"
    for rel in re.findall(r"`((?:cluster|serve)/[\w./-]+)`", text):
        assert (REPO / rel).exists(), f"docs/architecture.md names {rel}, which does not exist"
