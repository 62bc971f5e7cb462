"""Readers of the shipped cluster files for the tests (tests/test_cluster_image.py,
tests/test_cluster_chain.py, tests/test_chain_run.py): the Dockerfile's pip installs, the KubeRay
manifests, the Serve configs (including the RayService's embedded one), the training/eval configs,
and what each of them needs from the image (engines and extras).

No network, no Ray: parsing only.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "cluster" / "Dockerfile"
LAUNCHER = REPO / "cluster" / "aws-gpu-cluster.yaml"
KUBERAY = REPO / "cluster" / "kuberay"
SERVE_DIR = REPO / "serve"
TRAIN_DIR = REPO / "configs" / "train"
EVAL_DIR = REPO / "configs" / "eval"
CLUSTER_DOC = REPO / "docs" / "cluster.md"


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# --------------------------------------------------------------------------------------------------
# Dockerfile: instructions and the pip installs of its RUN lines


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(KEYWORD, arguments)`` per instruction: continuation lines joined, comment lines dropped
    (Docker drops a ``#`` line even inside a continued instruction), so a comment never counts."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    if pending:
        keyword, _, rest = pending.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _substitute(text: str, args: dict[str, str]) -> str:
    def repl(m):
        name = m.group(1) or m.group(2)
        return args.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, text)


@dataclass
class PipInstall:
    """One ``pip install`` command of a RUN line (ARG defaults substituted)."""

    run_index: int                              # which RUN instruction (0-based, in file order)
    requirements: list[str]                     # requirement specifiers as written (".[a,b]", "vllm==0.33.0")
    constraints: list[str] = field(default_factory=list)   # -c / --constraint files
    options: list[str] = field(default_factory=list)       # the other flags

    @property
    def project_extras(self) -> set[str]:
        """Extras of the project itself (``.[train,serve]``) this command installs."""
        extras: set[str] = set()
        for r in self.requirements:
            m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", r)
            if m and m.group(1):
                extras |= set(m.group(1).split(","))
        return extras

    @property
    def installs_project(self) -> bool:
        return any(re.fullmatch(r"\.(\[[\w,-]+\])?", r) for r in self.requirements)

    @property
    def packages(self) -> dict[str, str]:
        """name -> specifier of the named requirements (not the project)."""
        from packaging.requirements import Requirement

        out = {}
        for r in self.requirements:
            if r.startswith("."):
                continue
            req = Requirement(r)
            out[req.name.lower()] = str(req.specifier)
        return out


_PIP_VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
                      "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--platform",
                      "--python-version", "--no-binary", "--only-binary", "--cache-dir"}


def _shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a shell line, split at ``&&``, ``||``, ``;`` and ``|``."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for tok in lexer:
        if tok in ("&&", "||", ";", "|", "&"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        commands.append(current)
    return commands


def dockerfile_pip_installs(text: str | None = None) -> tuple[list[PipInstall], dict]:
    """Every ``pip install`` of the Dockerfile's RUN lines, in order, and facts about the file."""
    text = DOCKERFILE.read_text() if text is None else text
    args: dict[str, str] = {}
    installs: list[PipInstall] = []
    froms: list[str] = []
    runs: list[str] = []
    for keyword, rest in dockerfile_instructions(text):
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            if default:
                args[name.strip()] = default.strip().strip('"')
            continue
        if keyword == "FROM":
            froms.append(_substitute(rest, args))
            continue
        if keyword != "RUN":
            continue
        script = _substitute(rest, args)
        runs.append(script)
        for cmd in _shell_commands(script):
            while cmd and re.fullmatch(r"\w+=\S*", cmd[0]):  # VAR=value prefixes
                cmd = cmd[1:]
            if cmd[:2] == ["pip", "install"] or cmd[:2] == ["pip3", "install"]:
                argv = cmd[2:]
            elif len(cmd) > 4 and cmd[0].startswith("python") and cmd[1:4] == ["-m", "pip", "install"]:
                argv = cmd[4:]
            else:
                continue
            inst = PipInstall(run_index=len(runs) - 1, requirements=[])
            i = 0
            while i < len(argv):
                a = argv[i]
                if a in _PIP_VALUE_OPTIONS:
                    if a in ("-c", "--constraint"):
                        inst.constraints.append(argv[i + 1])
                    else:
                        inst.options += [a, argv[i + 1]]
                    i += 2
                    continue
                if a.startswith("--constraint="):
                    inst.constraints.append(a.split("=", 1)[1])
                elif a.startswith("-"):
                    inst.options.append(a)
                else:
                    inst.requirements.append(a)
                i += 1
            installs.append(inst)
    return installs, {"args": args, "froms": froms, "runs": runs}


# --------------------------------------------------------------------------------------------------
# KubeRay manifests and Serve configs


def manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected exactly one document (one concern per file), got {len(docs)}"
    return docs[0]


def rayjobs() -> list[tuple[str, dict]]:
    out = []
    for p in sorted(KUBERAY.glob("*.yaml")):
        doc = manifest(p.name)
        if doc.get("kind") == "RayJob":
            out.append((p.name, doc))
    return out


def rayjob_argv(name: str) -> list[str]:
    return shlex.split(manifest(name)["spec"]["entrypoint"])


def serve_configs() -> list[tuple[str, dict]]:
    """Every shipped Serve config: serve/*.yaml and the RayService's serveConfigV2."""
    out = [(str(p.relative_to(REPO)), load_yaml(p)) for p in sorted(SERVE_DIR.glob("*.yaml"))]
    for p in sorted(KUBERAY.glob("*.yaml")):
        doc = manifest(p.name)
        if doc.get("kind") == "RayService":
            out.append((f"{p.relative_to(REPO)}:serveConfigV2", yaml.safe_load(doc["spec"]["serveConfigV2"])))
    return out


def option_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------------------------------
# What each shipped config needs from the image


def _train_needs(cfg: dict) -> set[str]:
    needs = {"train"}  # DeepSpeed (every zero_stage) and tensorboardX: the train extra
    model = cfg.get("model") or {}
    if model.get("attn_implementation") == "flash":
        needs.add("gpu")
    lora = ((cfg.get("recipe") or {}).get("lora") or {})
    if lora.get("enabled"):
        needs.add("lora")
    if (cfg.get("run") or {}).get("tracking") == "mlflow":
        needs.add("mlflow")
    return needs


def _serve_needs(config: dict) -> set[str]:
    needs = {"serve"}
    for app in config.get("applications", []):
        for m in (app.get("args") or {}).get("models", []):
            if m.get("engine") == "vllm":
                needs.add("vllm")
            if m.get("attn_implementation") == "flash":
                needs.add("gpu")
    return needs


def _eval_needs(cfg: dict) -> set[str]:
    needs: set[str] = set()
    if cfg.get("engine") == "vllm":
        needs.add("vllm")
    return needs


def _job_needs(argv: list[str]) -> set[str]:
    """A RayJob/`ray job submit` entrypoint: the script's own needs plus its config's."""
    script = argv[1] if len(argv) > 1 else ""
    needs: set[str] = set()
    config = option_value(argv, "--config")
    if script == "jobs/train.py" and config:
        needs |= _train_needs(load_yaml(REPO / config))
    if script == "jobs/eval.py" and config:
        needs |= _eval_needs(load_yaml(REPO / config))
    if option_value(argv, "--engine") == "vllm":
        needs.add("vllm")
    if option_value(argv, "--attn-implementation") == "flash":
        needs.add("gpu")
    return needs


# modules that the launcher's setup commands import -> the extra that provides them
_MODULE_EXTRAS = {"deepspeed": "train", "flash_attn": "gpu", "vllm": "vllm", "peft": "lora", "fastapi": "serve",
                  "mlflow": "mlflow"}


def _launcher_needs(config: dict) -> set[str]:
    commands = list(config.get("setup_commands") or []) + list(config.get("head_setup_commands") or []) \
        + list(config.get("worker_setup_commands") or [])
    for node in (config.get("available_node_types") or {}).values():
        commands += list(node.get("worker_setup_commands") or [])
    needs: set[str] = set()
    for cmd in commands:
        for mod in re.findall(r"import\s+([\w., ]+)", cmd):
            for name in mod.split(","):
                top = name.strip().split(".")[0]
                if top in _MODULE_EXTRAS:
                    needs.add(_MODULE_EXTRAS[top])
    return needs


def shipped_needs() -> dict[str, set[str]]:
    """file (or file:part) -> the extras/engines it needs from the image (names of pyproject extras)."""
    out: dict[str, set[str]] = {}
    for p in sorted(TRAIN_DIR.glob("*.yaml")):
        out[str(p.relative_to(REPO))] = _train_needs(load_yaml(p))
    for p in sorted(EVAL_DIR.glob("*.yaml")):
        out[str(p.relative_to(REPO))] = _eval_needs(load_yaml(p))
    for where, config in serve_configs():
        out[where] = _serve_needs(config)
    for name, _ in rayjobs():
        out[f"cluster/kuberay/{name}"] = _job_needs(rayjob_argv(name))
    out[str(LAUNCHER.relative_to(REPO))] = _launcher_needs(load_yaml(LAUNCHER))
    return out
