"""The tree is the architecture: each layer imports only from the layers below it, with no import circle.

Floors, from the ground up: ``vrpo_kernels`` (kernels; nothing from vrpo), ``vrpo.errors`` and ``vrpo.files``
(what every layer may raise or write), ``vrpo.estimator`` (the maths), ``vrpo.models`` (LLaDA, Dream),
``vrpo.training`` and the evaluation modules of ``vrpo.eval`` (runs), ``vrpo.tasks`` (plug-in tasks), and the
entry points on top. The
imports are read from the source (module level and inside functions alike), so a function-level import
cannot hide an arrow that runs up.
"""

from __future__ import annotations

import ast
import re

from ..helpers import ROOT

FLOORS = {
    "vrpo_kernels": 0,
    "vrpo.errors": 1,
    "vrpo.files": 1,
    "vrpo.estimator": 2,
    "vrpo.models": 3,
    "vrpo.training": 4,
    "vrpo.eval.likelihood": 4,  # evaluation beside training; the vrpo.eval package itself is an entry point
    "vrpo.eval.model": 4,
    "vrpo.tasks": 5,
}
ENTRY = 6  # vrpo/__init__.py, vrpo.train, vrpo.plan, vrpo.eval (and its CLI), the deprecated aliases


def modules() -> dict[str, ast.Module]:
    out = {}
    for pkg in ("vrpo", "vrpo_kernels"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = (path, ast.parse(path.read_text()))
    return out


def floor(name: str) -> int:
    best = max((k for k in FLOORS if name == k or name.startswith(k + ".")), key=len, default=None)
    return FLOORS[best] if best is not None else ENTRY


def imports(name: str, path, tree: ast.Module) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of vrpo or vrpo_kernels in the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return [(m, line) for m, line in out if m.split(".")[0] in ("vrpo", "vrpo_kernels")]


def resolve(target: str, known) -> str:
    while target not in known and "." in target:
        target = target.rpartition(".")[0]
    return target


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for name, (path, tree) in mods.items():
        edges[name] = {resolve(t, mods) for t, _ in imports(name, path, tree)} - {name}
    return edges


def test_no_arrow_runs_up():
    mods = modules()
    up = []
    for name, (path, tree) in mods.items():
        for target, line in imports(name, path, tree):
            if floor(resolve(target, mods)) > floor(name):
                up.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not up, "imports that run up a layer:\n" + "\n".join(up)


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(w) :] + [w]))
            if w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(edges):
        if v not in state:
            visit(v)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checks above can fail: a models module importing the trainer is an arrow up, and a pair of modules
    importing each other is a circle."""
    tree = ast.parse("from ..training.trainer import VRPOTrainer\n")
    ((target, _),) = imports("vrpo.models.samplers", ROOT / "vrpo" / "models" / "samplers.py", tree)
    assert target == "vrpo.training.trainer.VRPOTrainer" and floor(target) > floor("vrpo.models.samplers")
    assert (
        floor("vrpo_kernels.attention")
        < floor("vrpo.estimator.elbo")
        < floor("vrpo.models.io")
        < floor("vrpo.training.trainer")
        < floor("vrpo.tasks.sort.task")
        < floor("vrpo.train")
    )


def test_imports_are_at_the_top_of_modules_within_the_package():
    """An import inside a function hides the dependency graph; only optional dependencies may (commented)."""
    hidden = []
    for name, (path, tree) in modules().items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and (
                    getattr(node, "level", 0)
                    or any(t.split(".")[0] in ("vrpo", "vrpo_kernels") for t, _ in imports(name, path, node))
                ):
                    hidden.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not hidden, "imports of vrpo inside functions:\n" + "\n".join(hidden)


def test_the_architecture_docs_layout_names_every_module():
    """The Layout section of docs/architecture.md is the tree: every module of the packages is named there
    (one line each), and nothing it names is missing from the tree."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    layout = text[text.index("## Layout") :]
    layout = layout[: layout.index("\n## ", 4)] if "\n## " in layout[4:] else layout
    missing = []
    for pkg in ("vrpo", "vrpo_kernels", "tools"):
        for path in sorted((ROOT / pkg).rglob("*.py")) if (ROOT / pkg).is_dir() else []:
            if path.name == "__init__.py":
                continue
            if f"`{path.name}`" not in layout and f"`{path.relative_to(ROOT)}`" not in layout:
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, "modules docs/architecture.md's Layout does not name:\n" + "\n".join(missing)
    named = {n for n in re.findall(r"`([\w/]+\.py)`", layout)}
    files = {
        p.name
        for pkg in ("vrpo", "vrpo_kernels", "tools", "benchmarks")
        if (ROOT / pkg).is_dir()
        for p in (ROOT / pkg).rglob("*.py")
    } | {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")}
    assert not named - files, f"the Layout section names files that do not exist: {sorted(named - files)}"
