"""The shape of the package: units (top-level modules and sub-packages) import only downward, nothing imports
in a cycle (lazy imports counted), and every function and class stays short enough to read in one go."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gpt2_jax"
# A unit is a top-level module (`model`) or a sub-package (`training`, `data`, `plan`). Lower layers never
# import higher ones; units of one layer do not import each other, except where SAME_LAYER lists it (the
# evaluate CLI serves HellaSwag's subcommand). Inside a sub-package its modules import each other freely, but
# never in a cycle.
LAYERS = [
    ["config", "storage", "distributed", "tokenizer", "cli"],
    ["sharding", "backends", "recipes"],
    ["pallas_attention"],
    ["attention", "loss"],
    ["model"],
    ["convert", "checkpoint", "data", "optim", "metrics"],
    ["runs", "runlock"],
    ["evaluate", "hellaswag", "generate", "plot"],
    ["training"],
    ["launch"],
    ["sample", "export", "plan"],
]
SAME_LAYER = {("evaluate", "hellaswag")}
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 150
MAX_TRAIN_PY_LINES = 100


def modules(package: Path = None) -> dict[str, Path]:
    """Every module of the package by dotted name relative to it (`training.step`; a sub-package's
    `__init__.py` is the sub-package's own name)."""
    package = package or PACKAGE
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def imports(module: str, package: Path = None) -> set[str]:
    """The package's modules that `module` imports anywhere in its file: top level, inside functions, lazily."""
    known = modules(package)
    tree = ast.parse(known[module].read_text())
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
            if parts[0] != "gpt2_jax":
                continue
            for end in range(len(parts), 1, -1):  # the longest prefix that is a module
                if (dotted := ".".join(parts[1:end])) in known:
                    found.add(dotted)
                    break
    found.discard(module)
    return found


def unit(module: str) -> str:
    return module.split(".")[0]


def test_every_unit_has_a_layer():
    placed = {m for layer in LAYERS for m in layer}
    units = {unit(m) for m in modules()}
    assert units <= placed, f"give {sorted(units - placed)} a layer in LAYERS"


def test_units_import_only_downward():
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    upward = []
    for m in modules():
        for dep in sorted(imports(m)):
            a, b = unit(m), unit(dep)
            if a != b and (rank[b] > rank[a] or (rank[b] == rank[a] and (a, b) not in SAME_LAYER)):
                upward.append(f"{m} (layer {rank[a]}) imports {dep} (layer {rank[b]})")
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


def test_the_checker_sees_lazy_and_package_imports(tmp_path, monkeypatch):
    """A function-level `from gpt2_jax.b import x` counts, and so does an import of a sub-package's module."""
    fake = tmp_path / "gpt2_jax"
    (fake / "pkg").mkdir(parents=True)
    (fake / "a.py").write_text("def f():\n    from gpt2_jax.b import g  # noqa\n")
    (fake / "b.py").write_text("from gpt2_jax import a\nfrom gpt2_jax.pkg.c import h\n")
    (fake / "pkg" / "__init__.py").write_text("")
    (fake / "pkg" / "c.py").write_text("import gpt2_jax.pkg\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert imports("a") == {"b"} and imports("b") == {"a", "pkg.c"} and imports("pkg.c") == {"pkg"}


def _too_long(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    long = []
    for n in ast.walk(tree):
        lines = getattr(n, "end_lineno", 0) - getattr(n, "lineno", 0) + 1
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and lines > MAX_FUNCTION_LINES:
            long.append(f"{path.relative_to(ROOT)}: function {n.name}: {lines} lines")
        elif isinstance(n, ast.ClassDef) and lines > MAX_CLASS_LINES:
            long.append(f"{path.relative_to(ROOT)}: class {n.name}: {lines} lines")
    return long


def test_functions_and_classes_are_short():
    long = [line for path in modules().values() for line in _too_long(path)]
    assert not long, "\n".join(long)


def test_the_length_checker_counts_classes_and_nested_functions(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"class C:\n    def f(self):\n{body.replace('    ', '        ')}\n" +
                                   "".join(f"    y{i} = {i}\n" for i in range(MAX_CLASS_LINES)))
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        found = _too_long(tmp_path / "m.py")
    finally:
        ROOT = old
    assert [line.split(": ")[1] for line in found] == ["class C", "function f"]


def test_train_py_is_an_entry_point():
    lines = len((ROOT / "train.py").read_text().splitlines())
    assert lines < MAX_TRAIN_PY_LINES, f"train.py has {lines} lines: move logic into gpt2_jax"
