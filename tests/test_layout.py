"""The package reads top-down: every import (also the ones inside functions) goes from a higher layer
to a lower one, and no module imports itself back through others."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# sdft's subpackages from the top (user-facing) down; a module may import its own package or lower ones.
LAYERS = [("cli", "integrations"), ("run",), ("config",), ("loss", "eval"), ("rollout",), ("prefix", "runtime"),
          ("models",), ("data",)]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    graph = {}
    for package in ("sdft", "sdft_kernels"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found, module = set(), _module(path)
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    base = package[:len(package) - node.level + 1] if node.level else []
                    name = ".".join(base + ([node.module] if node.module else []))
                    found.add((name, tuple(a.name for a in node.names)))
                elif isinstance(node, ast.Import):
                    found |= {(a.name, ()) for a in node.names}
            graph[module] = found

    def targets(name, names):  # `from a import b`: module a.b if there is one, else a itself
        subs = {f"{name}.{n}" for n in names if f"{name}.{n}" in graph}
        return subs if subs and len(subs) == len(names) else subs | {name}

    return {m: {d for name, names in deps for d in targets(name, names) if d in graph and d != m}
            for m, deps in graph.items()}


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "sdft_kernels":
        return "sdft_kernels"
    return parts[1] if len(parts) > 1 else None  # None: sdft/__init__, the facade over everything


def test_imports_go_down_the_layers():
    wrong = []
    for module, deps in _imports().items():
        source = _package(module)
        for dep in deps:
            target = _package(dep)
            if source == "sdft_kernels":
                ok = target == "sdft_kernels"  # the kernels know nothing of the training package
            elif source is None or target in (source, "sdft_kernels"):
                ok = True
            else:
                ok = target is not None and RANK[target] > RANK[source]
            if not ok:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the layering: " + ", ".join(sorted(wrong))


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_every_subpackage_has_a_layer():
    packages = {p.name for p in (ROOT / "sdft").iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in (ROOT / "sdft").glob("*.py") if p.stem != "__init__"}
    assert packages | modules == set(RANK), "a new subpackage or top-level module needs a place in LAYERS"
