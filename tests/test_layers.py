"""The layer rule: kronc's imports point down only, and no two modules import each other (even lazily).

Layers, bottom to top (a module may import from its own layer or below):

0. ``reference`` (plain torch math), ``budget``, ``tokens``, ``errors``, ``factory``, ``state_dicts``
1. ``codegen`` (kronc:: ops, Triton kernels, input checks)
2. ``formats``, ``sites``, ``inputs`` (checks of user models, weights and batches), ``values`` (the value
   codec, which formats store their tensors through)
3. ``modules``, ``plan``, ``capture``
4. ``planning``, ``passes``, ``policies``
5. ``pipeline``, ``recover``, ``serialize``, ``api``, ``scale`` (streamed and distributed compile)
6. ``integrations``
7. ``tools`` (cli, evaluate, report, resolve_model, zoo, toy, data, models)

``kronc/__init__.py`` and ``kronc/__main__.py`` are the package's front door and may import anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import kronc

ROOT = Path(kronc.__file__).parent
LAYERS: dict[str, int] = {
    "reference": 0, "budget": 0, "tokens": 0, "errors": 0, "factory": 0, "state_dicts": 0,
    "codegen": 1,
    "formats": 2, "sites": 2, "inputs": 2, "values": 2,
    "modules": 3, "plan": 3, "capture": 3,
    "planning": 4, "passes": 4, "policies": 4,
    "pipeline": 5, "recover": 5, "serialize": 5, "api": 5, "scale": 5,
    "integrations": 6,
    "tools": 7,
}
FRONT = {"kronc", "kronc.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _typing_only(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (imports for annotations, never run)."""
    return {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for stmt in node.body
        for inner in ast.walk(stmt)
    }


def _imports(path: Path, typing: bool = True) -> set[str]:
    """Every kronc module ``path`` imports, at any depth of the file (function-level imports too);
    ``typing=False`` leaves out the ``if TYPE_CHECKING:`` ones."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set() if typing else _typing_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kronc")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("kronc"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names if _exists(f"{target}.{a.name}")}
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


MODULES = sorted(ROOT.rglob("*.py"))


def test_every_top_level_module_has_a_layer() -> None:
    tops = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in MODULES} - {"__init__", "__main__"}
    assert tops <= set(LAYERS), f"modules without a layer: {sorted(tops - set(LAYERS))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path) -> None:
    source = _module_name(path)
    if source in FRONT:
        return
    mine = _layer(source)
    assert mine is not None
    found = _imports(path)
    unknown = sorted(t for t in found if t != "kronc" and _layer(t) is None)
    assert not unknown, f"{source} imports modules kronc does not have: {unknown}"
    upward = sorted(t for t in found if (_layer(t) or 0) > mine)
    assert not upward, f"{source} (layer {mine}) imports from above: {upward}"


def test_no_private_names_across_modules() -> None:
    """``from x import _name`` only for a private submodule of the importer's own package."""
    bad = []
    for path in MODULES:
        package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("kronc")):
                own = node.level == 1 and node.module is None  # from . import _sibling
                bad += [
                    f"{_module_name(path)}: {a.name}" for a in node.names
                    if a.name.startswith("_") and not (own and _exists(f"{package}.{a.name}"))
                ]
    assert not bad, f"private names imported across modules: {bad}"


def test_no_import_cycles() -> None:
    """No two modules import each other at run time. A type annotation may name a class of a module that
    imports this one (``if TYPE_CHECKING:``, never executed); such imports must still point down."""
    graph = {_module_name(p): {t for t in _imports(p, typing=False) if _exists(t)} - {_module_name(p)} for p in MODULES}
    # a package's __init__ re-exporting its children is not a cycle with them: drop parent -> child edges
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state and m not in FRONT:
            visit(m)


@pytest.mark.slow
def test_import_kronc_registers_ops_but_not_the_dynamo_backend() -> None:
    code = (
        "import torch, torch._dynamo.backends.registry as r\n"
        "before = set(r._COMPILER_FNS)\n"
        "import kronc\n"
        "assert hasattr(torch.ops.kronc, 'kron_linear')\n"
        "print(sorted(set(r._COMPILER_FNS) - before))\n"
        "kronc.register_backend()\n"
        "from kronc.integrations.torch_compile import kronc_backend\n"
        "print(r.lookup_backend('kronc') is kronc_backend)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]", f"import kronc registered dynamo backends: {out[0]}"
    assert out[1] == "True"


def test_no_function_level_imports_of_kronc() -> None:
    """Imports of kronc modules sit at the top of a file; the one exception is the Triton kernels, which
    the ops import when a kernel runs (triton is optional and slow to import)."""
    late = []
    for path in MODULES:
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("kronc")):
                    if not (node.module or "").startswith(("triton", "kronc.codegen.triton")):
                        late.append(f"{_module_name(path)}.{fn.name}: {node.module}")
                elif isinstance(node, ast.Import) and any(a.name.startswith("kronc") for a in node.names):
                    late.append(f"{_module_name(path)}.{fn.name}: {[a.name for a in node.names]}")
    assert not late, f"function-level kronc imports: {late}"


MAX_LINES = 500
TOO_LONG_ALLOWED: set[str] = set()  # a module being split may stand here while the split is under way


def test_no_module_over_500_lines() -> None:
    """Small single-purpose modules: a file over MAX_LINES lines is doing more than one thing."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES}
    long = sorted(f"{name} ({n} lines)" for name, n in sizes.items() if n > MAX_LINES and name not in TOO_LONG_ALLOWED)
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"
    stale = sorted(name for name in TOO_LONG_ALLOWED if sizes.get(name, 0) <= MAX_LINES)
    assert not stale, f"allowed long modules that are short now (drop them from TOO_LONG_ALLOWED): {stale}"
