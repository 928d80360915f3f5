"""The package's layers: imports point down only and there is no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

import qcompress

ROOT = Path(qcompress.__file__).parent
# Higher numbers sit above lower ones; a module may import only its own layer or lower ones.
LAYERS = {
    "cli": 6, "__main__": 6, "api": 5, "jobs": 4, "core": 3,
    "quant": 2, "prune": 2, "training": 2, "bench": 2, "runtime": 2,
    "data": 1, "metrics": 1, "reports": 1,
    "models": 0, "defaults": 0, "errors": 0, "io_utils": 0, "_warnings": 0, "torch_state": 0, "__init__": 0,
}


def _module(path: Path) -> str:
    return ".".join(("qcompress", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qcompress"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("qcompress")}
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) - {_module(p)} for p in ROOT.rglob("*.py")}


def test_every_top_level_module_has_a_layer():
    assert {_module(p).split(".")[1] for p in ROOT.rglob("*.py") if _module(p) != "qcompress"} <= set(LAYERS)


def test_imports_point_down():
    upward = [(a, b) for a, deps in _graph().items() for b in deps if _layer(b) > _layer(a)]
    assert upward == []


def test_no_import_circle():
    graph = _graph()
    graph = {m: {d for d in deps if d in graph and not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycle.extend(path[path.index(dep):] + [node, dep] if dep in path else [node, dep])
                return True
            if dep not in state and visit(dep, path + [node]):
                return True
        state[node] = 2
        return False

    assert not any(visit(m, []) for m in sorted(graph) if m not in state), cycle


def test_no_architecture_named_outside_models():
    from qcompress.models.registry import list_archs

    names = [a.name for a in list_archs()]
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).parts[0] in ("models", "cli"):  # CLI help text may give examples
            continue
        code = path.read_text()
        offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if f'"{n}"' in code or f"'{n}'" in code]
    assert offenders == []


def test_api_is_a_thin_facade():
    assert len((ROOT / "api.py").read_text().splitlines()) <= 200
