"""The import graph points one way: scripts -> motif_jax (cli -> rl -> train -> data / convert -> model -> parallel
-> config) -> motif_kernels, and no module imports itself back through others (function-level imports count too: a
local import hides a cycle, it does not remove it)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# a layer may import only layers of a lower rank
RANK = {"motif_kernels": 0, "config": 1, "parallel": 2, "model": 3, "convert": 4, "data": 4, "train": 5, "rl": 6,
        "cli": 7}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("motif_jax", "motif_kernels"):
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``name`` imports (absolute and relative, at any depth in the file)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from pkg import mod` imports the module pkg.mod when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a package path: the deepest project module named
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return "motif_kernels" if parts[0] == "motif_kernels" else (parts[1] if len(parts) > 1 else "motif_jax")


def test_layers_import_only_lower_layers():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        src = _layer(name)
        for dep in _imports(name, path, set(mods)):
            dst = _layer(dep)
            if src == dst or "motif_jax" in (src, dst):
                continue  # within a layer (cycles are checked below); the package's own __init__
            assert src in RANK and dst in RANK, f"{name} -> {dep}: add its layer to RANK"
            if RANK[dst] >= RANK[src]:
                bad.append(f"{name} -> {dep}")
    assert not bad, "imports against the layer order: " + ", ".join(bad)


def test_no_module_imports_itself_back():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    # Packages' __init__ re-exports are edges too; a package importing its own submodules is not a cycle back.
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if node.startswith(dep + "."):  # a submodule importing its package: runs the package's __init__ first
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle_and_a_backward_import(tmp_path, monkeypatch):
    """The two checks above fail on a graph that has what they look for (so their passing means something)."""
    pkg = tmp_path / "motif_jax"
    for sub in ("parallel", "model"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "parallel" / "mesh.py").write_text("from motif_jax.model import layers\n")
    (pkg / "model" / "layers.py").write_text("from ..parallel import mesh\n")
    (tmp_path / "motif_kernels").mkdir()
    (tmp_path / "motif_kernels" / "__init__.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for check, says in ((test_layers_import_only_lower_layers, "motif_jax.parallel.mesh -> motif_jax.model.layers"),
                        (test_no_module_imports_itself_back, "motif_jax.model.layers -> motif_jax.parallel.mesh")):
        try:
            check()
        except AssertionError as e:
            assert says in str(e), e
        else:
            raise AssertionError(f"{check.__name__} passed on a bad graph")
