"""The import structure of ``phantom_ray/`` and its map in docs/architecture.md, read from the source
(AST, nothing imported):

* the code map lists every package and module of ``phantom_ray/`` and nothing that is not there;
* every import points to the same layer of the map or a lower one, and no two top-level packages
  import each other in a loop; a package's ``cli.py`` (its verb) counts as an edge; ``infer/`` never
  imports ``vllm/`` (the backend registry names it);
* no module imports another module's private (``_underscore``) name;
* no test module imports another test module, or redefines a helper of tests/helpers.py.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "phantom_ray"
LAYERS = ("ground", "model", "engine", "stages", "edges")


def _units() -> dict[str, Path]:
    """Top-level packages and modules of phantom_ray (``name`` -> path)."""
    out = {}
    for p in sorted(PKG.iterdir()):
        if p.is_dir() and (p / "__init__.py").exists():
            out[p.name] = p
        elif p.suffix == ".py" and p.name != "__init__.py":
            out[p.stem] = p
    return out


def _code_map() -> dict[str, tuple[str, str]]:
    """The code map table of docs/architecture.md: unit -> (layer, what it owns)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Code map", 1)[1]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\|\s*(\w+)\s*\|\s*`phantom_ray/([\w]+)(/|\.py)`\s*\|(.*)\|\s*$", line)
        if m:
            layer, name, _, what = m.groups()
            assert name not in rows, f"docs/architecture.md: {name} has two rows in the code map"
            rows[name] = (layer, what)
    return rows


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import in ``path``, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; write phantom_ray.... in full"
            out.append((node.lineno, node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
    return out


def _unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "phantom_ray" or len(parts) < 2:
        return None
    return parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _sources():
    return sorted(PKG.rglob("*.py"))


def test_code_map_lists_every_package_and_module_and_nothing_else():
    units, rows = _units(), _code_map()
    missing = sorted(set(units) - set(rows))
    absent = sorted(set(rows) - set(units))
    assert not missing, f"docs/architecture.md's code map has no row for phantom_ray/{missing}: add one (layer, what)"
    assert not absent, f"docs/architecture.md's code map lists phantom_ray/{absent}, which do not exist"
    bad_layers = {n: layer for n, (layer, _) in rows.items() if layer not in LAYERS}
    assert not bad_layers, f"unknown layers {bad_layers}; use one of {LAYERS}"
    for name, path in units.items():
        if not path.is_dir():
            continue
        what = rows[name][1]
        named = set(re.findall(r"`(\w+)\.py`", what))
        have = {p.stem for p in path.glob("*.py") if p.name != "__init__.py"}
        assert have <= named, (f"docs/architecture.md: the phantom_ray/{name}/ row does not name "
                               f"{sorted(have - named)}; say what each module owns")
        assert named <= have, f"docs/architecture.md: the phantom_ray/{name}/ row names {sorted(named - have)}, absent"


def test_imports_point_down_the_layers_without_loops():
    rows = _code_map()
    rank = {name: LAYERS.index(layer) for name, (layer, _) in rows.items()}
    edges: dict[str, set[str]] = {}
    upward = []
    for path in _sources():
        src = _unit_of(_module_name(path))
        # a package's verb (pkg/cli.py) is an edge: it may use anything, and is no arrow of its package
        src_rank = len(LAYERS) - 1 if path.name == "cli.py" and path.parent != PKG else rank.get(src)
        for line, module, names in _imports(path):
            targets = {_unit_of(module)}
            if module == "phantom_ray":  # from phantom_ray import storage
                targets = {n for n in names}
            for dst in targets - {None, src}:
                if dst not in rank:
                    continue
                if src_rank != rank.get(src):
                    continue  # the verb of a package
                edges.setdefault(src, set()).add(dst)
                if rank[dst] > src_rank:
                    upward.append(f"{path.relative_to(REPO)}:{line}: {src} ({LAYERS[src_rank]}) imports "
                                  f"{dst} ({LAYERS[rank[dst]]})")
    assert not upward, "imports that run back up the layers:\n" + "\n".join(upward)
    # no loop between top-level units (depth-first search for a back edge)
    state: dict[str, int] = {}

    def visit(u: str, trail: list[str]) -> None:
        state[u] = 1
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                raise AssertionError("import loop: " + " -> ".join(trail[trail.index(v):] + [v]))
            if v not in state:
                visit(v, trail + [v])
        state[u] = 2

    for u in sorted(edges):
        if u not in state:
            visit(u, [u])


def test_infer_never_imports_vllm():
    offenders = []
    for path in sorted((PKG / "infer").rglob("*.py")):
        for line, module, names in _imports(path):
            if module == "vllm" or module.startswith(("vllm.", "phantom_ray.vllm")) or (
                    module == "phantom_ray" and "vllm" in names):
                offenders.append(f"{path.relative_to(REPO)}:{line}: import {module}")
    assert not offenders, "infer/ imports vllm (name the backend in infer/api.py's ENGINES instead):\n" + \
        "\n".join(offenders)


def test_no_module_imports_another_modules_private_name():
    offenders = []
    for path in _sources():
        for line, module, names in _imports(path):
            if not module.startswith("phantom_ray"):
                continue  # third-party privates are the business of the code that wraps them
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in module.split(".") if p.startswith("_") and not p.startswith("__")]
            if private:
                offenders.append(f"{path.relative_to(REPO)}:{line}: from {module} import {', '.join(private)}")
    assert not offenders, "private names imported across modules (make them public or move them):\n" + \
        "\n".join(offenders)


def test_no_test_module_imports_another_test_module():
    """Shared test code lives in tests/helpers.py (or a topic helpers module), never in a test_*.py."""
    offenders = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for line, module, _ in _imports(path):
            if module.split(".")[0].startswith("test_") or module.startswith("tests.test_"):
                offenders.append(f"{path.relative_to(REPO)}:{line}: imports {module}")
    assert not offenders, "\n".join(offenders)


def test_no_test_module_redefines_a_shared_helper():
    """A function tests/helpers.py provides (``free_port``, ``png_bytes``, ...) is not written again,
    with or without a leading underscore, in another file under tests/."""
    shared = {n.name for n in ast.parse((REPO / "tests" / "helpers.py").read_text()).body
              if isinstance(n, ast.FunctionDef)}
    offenders = []
    for path in sorted((REPO / "tests").glob("*.py")):
        if path.name == "helpers.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in shared:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: def {node.name} (use helpers.{node.name.lstrip('_')})")
    assert not offenders, "\n".join(offenders)


def test_the_checks_see_what_they_claim(tmp_path):
    """The walkers read function-level imports and ``from phantom_ray import x`` too."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from phantom_ray.infer.core import _hidden\n    from phantom_ray import vllm\n")
    assert _imports(f) == [(2, "phantom_ray.infer.core", ["_hidden"]), (3, "phantom_ray", ["vllm"])]
    assert _unit_of("phantom_ray.infer.core") == "infer" and _unit_of("vllm.engine") is None
