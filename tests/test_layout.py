"""The rooms stay honest: small modules and functions, thin Flower handlers, no library function
that pytest would take for a test, no import cycle, and task code that knows nothing of Flower.

Read from the source (``ast``), nothing is imported. The project's modules are the ``.py``
files below :data:`ROOTS`; tests/ is not among them.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS: tuple[str, ...] = ("m4fuse", "client", "server", "simulations", "benchmarks")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60  # docstring included
MAX_HANDLER_LINES = 40
#: The Flower apps, whose handlers (``@app.train()``, ``@app.main()`` ...) only translate messages.
FLOWER_APPS: tuple[str, ...] = ("client/app.py", "server/app.py")
#: The frozen copy of the network before its speed-up, the peer that benchmarks/bench_speed.py
#: times against: kept as it was written, so it is exempt from the size rules.
SIZE_EXEMPT: frozenset[str] = frozenset({"benchmarks/m4fuse_before_speedup.py"})
#: What the task code (m4fuse/) must never import: the federated side is built on top of it.
FEDERATED_PACKAGES: frozenset[str] = frozenset({"flwr", "client", "server"})

Function = ast.FunctionDef | ast.AsyncFunctionDef


@dataclass(frozen=True)
class Module:
    """One of the project's source files, parsed."""

    name: str  # dotted, e.g. "m4fuse.data.synth" ("m4fuse.data" for its __init__.py)
    path: str  # relative to the repository, e.g. "m4fuse/data/synth.py"
    tree: ast.Module
    lines: int


@functools.cache
def project_modules() -> dict[str, Module]:
    """Every module below :data:`ROOTS`, by dotted name."""
    modules = {}
    for root in ROOTS:
        for file in sorted((REPO / root).rglob("*.py")):
            rel = file.relative_to(REPO)
            name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            source = file.read_text()
            modules[name] = Module(name, rel.as_posix(), ast.parse(source), len(source.splitlines()))
    return modules


def functions(module: Module) -> Iterator[Function]:
    """Every function and method of ``module``, nested ones included."""
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def length(node: Function) -> int:
    """Lines of a function from its ``def`` to its last line (decorators not counted)."""
    return node.end_lineno - node.lineno + 1  # type: ignore[operator]


def is_handler(node: Function) -> bool:
    """A Flower handler: decorated with a call on an attribute (``@app.train()``)."""
    return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) for d in node.decorator_list)


def imported_names(module: Module) -> Iterator[str]:
    """Every dotted name ``module`` imports (at its top or inside functions; not the imports
    under ``if TYPE_CHECKING:``, which never run). ``from a.b import c`` gives ``a.b`` and
    ``a.b.c``."""
    skipped: set[int] = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(inner) for inner in ast.walk(node)}
    for node in ast.walk(module.tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module name of a ``from ... import`` (relative ones resolved)."""
    if node.level == 0:
        return node.module or ""
    package = module.name.split(".")
    if not module.path.endswith("__init__.py"):
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name is mapped to its longest prefix that
    is a project module; a module's own packages are left out: importing them is no cycle)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, module in modules.items():
        targets = set()
        for imported in imported_names(module):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _report(problems: list[str]) -> str:
    return f"{len(problems)} problem(s):\n" + "\n".join(problems)


def test_no_module_over_500_lines() -> None:
    problems = [f"{m.path}: {m.lines} lines" for m in project_modules().values()
                if m.path not in SIZE_EXEMPT and m.lines > MAX_MODULE_LINES]
    assert not problems, _report(problems)


def test_no_function_over_60_lines() -> None:
    problems = [f"{m.path}:{f.lineno} {f.name}: {length(f)} lines"
                for m in project_modules().values() if m.path not in SIZE_EXEMPT
                for f in functions(m) if length(f) > MAX_FUNCTION_LINES]
    assert not problems, _report(problems)


def test_flower_handlers_under_40_lines() -> None:
    modules = {m.path: m for m in project_modules().values()}
    problems = []
    for path in FLOWER_APPS:
        handlers = [f for f in functions(modules[path]) if is_handler(f)]
        assert handlers, f"{path}: no Flower handler found (@app.<message>())"
        problems += [f"{path}:{f.lineno} {f.name}: {length(f)} lines"
                     for f in handlers if length(f) > MAX_HANDLER_LINES]
    assert not problems, _report(problems)


def test_no_library_function_named_test() -> None:
    problems = [f"{m.path}:{f.lineno} {f.name}" for m in project_modules().values()
                for f in functions(m) if f.name.startswith("test_")]
    assert not problems, _report(problems)


def test_no_import_cycle() -> None:
    problems = [" <-> ".join(component) for component in cycles(import_graph())]
    assert not problems, _report(problems)


def test_imports_inside_functions_count_and_type_checking_ones_do_not() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n"
        "    from m4fuse.nets.model import M4Fuse\n"
        "def f():\n"
        "    import flwr.common\n"
    )
    module = Module("m4fuse.data.x", "m4fuse/data/x.py", ast.parse(source), 6)
    names = set(imported_names(module))
    assert {"flwr.common", "m4fuse.data", "m4fuse.data.sibling"} <= names
    assert not any(name.startswith("m4fuse.nets") for name in names)


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_task_code_never_imports_flower_client_or_server() -> None:
    problems = [f"{m.path}: imports {name}" for m in project_modules().values()
                if m.name.split(".")[0] == "m4fuse"
                for name in sorted(set(imported_names(m)))
                if name.split(".")[0] in FEDERATED_PACKAGES]
    assert not problems, _report(problems)
