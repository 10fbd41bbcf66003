"""The shape of the package: modules import only downward (no cycles, lazy imports counted), and the
trainer's functions stay short enough to read in one go."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2_jax"
# Lower layers never import higher ones; a module may import the ones at its own layer or below only
# where listed in SAME_LAYER (e.g. the evaluate CLI serves HellaSwag's subcommand).
LAYERS = [
    ["config", "storage"],
    ["model"],
    ["convert", "checkpoint", "data", "sharding", "optim", "metrics"],
    ["runs"],
    ["evaluate", "hellaswag", "generate", "plot"],
    ["trainer"],
    ["sample", "export", "plan"],
]
SAME_LAYER = {("evaluate", "hellaswag")}
MAX_TRAINER_FUNCTION_LINES = 60


def imports(module: str) -> set[str]:
    """gpt2_jax modules `module` imports anywhere in its file: top level, inside functions, lazily."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from gpt2_jax import data` names a module; `from gpt2_jax.data import X` the module itself
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "gpt2_jax" and len(parts) > 1 and (PACKAGE / f"{parts[1]}.py").is_file():
                found.add(parts[1])
    found.discard(module)
    return found


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_every_module_has_a_layer():
    placed = {m for layer in LAYERS for m in layer}
    assert set(modules()) <= placed, f"give {sorted(set(modules()) - placed)} a layer in LAYERS"


def test_modules_import_only_downward():
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    upward = [f"{m} (layer {rank[m]}) imports {dep} (layer {rank[dep]})"
              for m in modules() for dep in sorted(imports(m))
              if rank[dep] > rank[m] or (rank[dep] == rank[m] and (m, dep) not in SAME_LAYER)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = {m: imports(m) for m in modules()}
    state: dict[str, str] = {}  # "visiting" | "done"

    def visit(m, path):
        if state.get(m) == "visiting":
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == "done":
            return
        state[m] = "visiting"
        for dep in sorted(graph.get(m, ())):
            visit(dep, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])


def test_the_checker_sees_lazy_imports(tmp_path, monkeypatch):
    """A function-level `from gpt2_jax.trainer import x` counts: the checker must not only read the top."""
    fake = tmp_path / "gpt2_jax"
    fake.mkdir()
    (fake / "a.py").write_text("def f():\n    from gpt2_jax.b import g  # noqa\n")
    (fake / "b.py").write_text("from gpt2_jax import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert imports("a") == {"b"} and imports("b") == {"a"}


def test_trainer_functions_are_short():
    tree = ast.parse((PACKAGE / "trainer.py").read_text())
    long = [f"{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.end_lineno - n.lineno + 1 > MAX_TRAINER_FUNCTION_LINES]
    assert not long, long
