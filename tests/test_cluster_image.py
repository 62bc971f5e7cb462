"""The cluster image (cluster/Dockerfile) runs every shipped config.

From every shipped config and manifest (training and eval configs, Serve configs including the
RayService's embedded one, the RayJobs' entrypoints, the launcher's setup commands) the engines and
extras each needs are derived (engine vllm -> vllm; DeepSpeed training -> train; LoRA -> lora; flash
attention -> gpu (flash-attn); serving -> serve), and the Dockerfile's RUN lines are parsed (comment
lines dropped, continuation lines joined, ARG defaults substituted) to check that its pip installs
provide them, in an order that keeps the torch build vLLM pins. Where a docker daemon answers, the
image is built (slow); otherwise that test is skipped and says so.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

import cluster_files as cf


def _installed() -> tuple[set[str], dict[str, str]]:
    installs, _ = cf.dockerfile_pip_installs()
    extras: set[str] = set()
    packages: dict[str, str] = {}
    for inst in installs:
        extras |= inst.project_extras
        packages.update(inst.packages)
    return extras, packages


def _provides(need: str, extras: set[str], packages: dict[str, str]) -> bool:
    """The image provides ``need`` (a pyproject extra) through the extra itself or every package of it."""
    from packaging.requirements import Requirement

    if need in extras:
        return True
    reqs = [Requirement(r) for r in cf.pyproject()["project"]["optional-dependencies"][need]]
    return all(r.name.lower() in packages for r in reqs)


def test_needs_are_derived_from_every_shipped_config():
    needs = cf.shipped_needs()
    # the derivation sees what the configs say (so the check below has something to check)
    assert "vllm" in needs["serve/gpu-cluster.yaml"] and "gpu" in needs["serve/gpu-cluster.yaml"]
    assert "vllm" in needs["cluster/kuberay/rayservice.yaml:serveConfigV2"]
    assert any("train" in v for k, v in needs.items() if k.startswith("configs/train/"))
    assert "vllm" in needs["cluster/kuberay/rayjob-caption.yaml"], "the caption RayJob runs on vLLM"
    extras = set(cf.pyproject()["project"]["optional-dependencies"])
    for where, need in needs.items():
        assert need <= extras, f"{where}: needs {need - extras}, which pyproject.toml does not define"


@pytest.mark.parametrize("where", sorted(cf.shipped_needs()))
def test_the_image_installs_what_each_shipped_config_needs(where):
    need = cf.shipped_needs()[where]
    extras, packages = _installed()
    missing = sorted(n for n in need if not _provides(n, extras, packages))
    assert not missing, (f"{where} needs {missing}, which no `pip install` RUN line of cluster/Dockerfile "
                         f"installs (extras installed: {sorted(extras)}, packages: {sorted(packages)})")


def test_a_comment_does_not_count_as_an_install():
    text = cf.DOCKERFILE.read_text() + '\n# RUN pip install ".[mlflow]" mlflow\nRUN echo pip install mlflow\n'
    installs, _ = cf.dockerfile_pip_installs(text)
    assert all("mlflow" not in i.project_extras and "mlflow" not in i.packages for i in installs)


def test_vllm_goes_in_first_and_every_later_install_keeps_its_torch():
    from packaging.requirements import Requirement

    installs, facts = cf.dockerfile_pip_installs()
    first_vllm = next((i for i, inst in enumerate(installs) if "vllm" in inst.packages), None)
    assert first_vllm is not None, "cluster/Dockerfile: vLLM is installed by name and version (its CUDA build)"
    vllm_spec = installs[first_vllm].packages["vllm"]
    assert vllm_spec.startswith("=="), f"pin vLLM (it pins torch): got vllm{vllm_spec}"
    (extra_req,) = [Requirement(r) for r in cf.pyproject()["project"]["optional-dependencies"]["vllm"]]
    assert extra_req.specifier.contains(vllm_spec[2:]), f"vllm{vllm_spec} is outside pyproject's {extra_req}"
    for inst in installs[:first_vllm + 1]:
        assert "torch" not in inst.packages, "torch comes from vLLM's pin, not installed on its own before it"
    # ray stays the base image's version while vLLM resolves
    assert installs[first_vllm].packages.get("ray") == f"=={facts['args']['RAY_VERSION']}"

    # the constraints file is written in the vLLM RUN line from what pip installed, and names torch
    vllm_run = facts["runs"][installs[first_vllm].run_index]
    later = [inst for inst in installs[first_vllm + 1:] if inst.run_index > installs[first_vllm].run_index]
    assert later, "the project is installed after vLLM"
    constraint_files = {c for inst in later for c in inst.constraints}
    assert len(constraint_files) == 1, f"one constraints file for every later install, got {constraint_files}"
    (cfile,) = constraint_files
    assert f"> {cfile}" in vllm_run and "pip list --format=freeze" in vllm_run and "torch" in vllm_run, (
        f"{cfile} must be written by the vLLM RUN line from pip's own list and keep torch")
    for inst in later:
        assert inst.constraints or "--no-deps" in inst.options, (
            f"RUN #{inst.run_index} installs {inst.requirements} without the constraints: it may replace torch")
        assert "torch" not in inst.packages, "a later install names torch (vLLM's pin is the torch)"
        assert not any(o in ("-i", "--index-url", "--extra-index-url") for o in inst.options), (
            "a later install from another index could bring another torch build")
    assert any(inst.installs_project for inst in later), "the project is installed after vLLM"
    # flash-attn builds against that torch
    (gpu,) = [inst for inst in installs if "gpu" in inst.project_extras]
    assert "--no-build-isolation" in gpu.options, "flash-attn must build against the installed torch"


def test_the_image_is_a_cuda_ray_image_of_the_pinned_ray():
    import re

    installs, facts = cf.dockerfile_pip_installs()
    (base,) = facts["froms"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(facts['args']['RAY_VERSION'])}-py3\d+-cu\d+", base), base


def _docker_daemon() -> str | None:
    """None when a docker daemon answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker client on this machine"
    try:
        r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker info` failed: {exc}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no docker daemon (`docker info` exited {r.returncode}: {last})"
    return None


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_the_image_builds():
    why = _docker_daemon()
    if why is not None:
        pytest.skip(reason=f"cluster image build not run: {why}")
    r = subprocess.run(["docker", "build", "-f", "cluster/Dockerfile", "-t", "phantom-ray:test", "."],
                       cwd=cf.REPO, capture_output=True, text=True, timeout=7000)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
