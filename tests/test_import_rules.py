"""The import rules of docs/architecture.md, read from the source (every import, at the top or inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "duetgen"
# Packages in layers: a package may import only from packages listed after it (cli on top, data at the bottom;
# progress and llm are leaves used from several layers).
LAYERS = ["cli", "serve", "train", "eval", "shapeworld", "infer", "models", "diffusion", "data", "llm", "progress"]
# models/ may read two diffusion files: the parameterisation and the sampler settings a checkpoint records
MODELS_MAY_IMPORT_FROM_DIFFUSION = {"duetgen.diffusion.flow_matching", "duetgen.diffusion.schedules"}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports() -> dict[str, set[str]]:
    """module -> the duetgen modules it imports (``from pkg import module`` resolved to the module)."""
    known = modules()

    def resolve(target: str) -> str | None:
        parts = target.split(".")
        return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known), None)

    graph = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("duetgen"):
                targets |= {resolve(f"{node.module}.{alias.name}") or resolve(node.module) for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {resolve(alias.name) for alias in node.names if alias.name.startswith("duetgen")}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_packages_import_only_downwards():
    wrong = sorted(f"{a} imports {b}" for a, targets in imports().items() for b in targets
                   if package(a) in LAYERS and package(b) in LAYERS and package(a) != package(b)
                   and LAYERS.index(package(b)) < LAYERS.index(package(a)))
    assert not wrong, wrong


def test_models_import_no_sampler_no_inference_and_data_eval_no_shapeworld():
    graph = imports()
    wrong = [f"{a} imports {b}" for a, targets in graph.items() for b in targets
             if package(a) == "models" and package(b) == "diffusion" and b not in MODELS_MAY_IMPORT_FROM_DIFFUSION]
    wrong += [f"{a} imports {b}" for a, targets in graph.items() for b in targets
              if package(a) in ("data", "eval") and package(b) == "shapeworld"]
    assert not wrong, wrong
    assert graph["duetgen.data.record"] == set()  # the record type depends on nothing of ours


def test_no_import_cycles():
    graph = imports()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert cycles == []
