"""The package's layering: no import cycles, no import of a layer above, and every module imports alone.

The graph is read from the source (every `import`, function-level ones included; imports under
`if TYPE_CHECKING:` are left out, they never run). Importing `a.b.c` also runs `a/__init__` and
`a/b/__init__`, so those are edges too.
"""

from __future__ import annotations

import ast
import multiprocessing
import pathlib
import re
import traceback

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2] / "src"
PACKAGE = "beam_moe"

# Lowest first. A module may import its own layer and the layers below, never one above. The
# package facade (`beam_moe/__init__.py`) is above everything: it re-exports, nothing imports it.
LAYERS: list[tuple[str, ...]] = [
    ("version", "errors", "lazy"),
    (
        "atomic",
        "statefile",
        "threads",
        "outputs",
        "presets",
        "threshold_curve",
        "families",
        "tiny_models",
        "mask",
        "stats",
        "native",
        "experts",
        "native_router",
    ),
    ("routing", "config", "identity"),
    ("layer",),
    ("attach",),
    ("adapter", "budget", "base_models", "merged"),
    ("eval",),
    ("train",),
    ("loading",),
    ("bench", "serving"),
    ("refmoe", "experiments"),
    ("cli",),
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_files() -> dict[str, pathlib.Path]:
    found = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imported(module: str, node: ast.AST, is_package: bool, modules: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (and the packages those imports run)."""
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets: set[str] = set()
        for node in _runtime_nodes(tree):
            for name in _imported(module, node, path.name == "__init__.py", modules):
                if name != PACKAGE and not name.startswith(PACKAGE + "."):
                    continue
                while name not in modules:
                    name = name.rsplit(".", 1)[0]
                parts = name.split(".")
                targets.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        targets.discard(module)
        # A package's own submodules are not "above" it: importing them is what __init__ is for.
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def unit_of(module: str) -> str:
    return module.split(".")[1] if "." in module else PACKAGE


def test_every_module_has_a_layer():
    units = {unit_of(m) for m in module_files()} - {PACKAGE}
    assert units - set(RANK) == set(), "add the new module or package to LAYERS"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_no_module_imports_a_layer_above_it():
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module != PACKAGE
        for target in targets
        if target != PACKAGE and RANK[unit_of(target)] > RANK[unit_of(module)]
    )
    assert upward == []


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The checks above can fail: a hidden function-level cycle and an upward import are found."""
    graph = import_graph()
    graph["beam_moe.errors"] = {*graph["beam_moe.errors"], "beam_moe.cli"}
    assert find_cycle(graph) is not None
    assert RANK[unit_of("beam_moe.cli")] > RANK[unit_of("beam_moe.errors")]
    tree = ast.parse("def f():\n    from beam_moe.cli import main\n")
    found = [n for node in _runtime_nodes(tree) for n in _imported("beam_moe.errors", node, False, {})]
    assert found == ["beam_moe.cli"]


def _import_alone(name: str, answers) -> None:
    import importlib
    import sys

    assert not [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]
    try:
        importlib.import_module(name)
        answers.put((name, None))
    except BaseException:
        answers.put((name, traceback.format_exc(limit=3)))


@pytest.mark.slow
def test_every_module_imports_alone():
    """Each module in a process where no beam_moe module was imported before it.

    A forked child per module, from a parent that imported only the third-party libraries (torch,
    transformers, vLLM when installed): an import that works only after another beam_moe module
    fails here, at a fraction of the cost of a new interpreter per module.
    """
    import importlib.util

    for library in ("torch", "transformers", "safetensors", "vllm"):
        if importlib.util.find_spec(library) is not None:
            importlib.import_module(library)
    import sys

    loaded = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] == PACKAGE}
    context = multiprocessing.get_context("fork")
    failures = {}
    try:
        for name in sorted(module_files()):
            if name.endswith("__main__"):
                continue
            answers = context.Queue()
            child = context.Process(target=_import_alone, args=(name, answers))
            child.start()
            child.join(120)
            error = answers.get(timeout=5)[1] if child.exitcode == 0 else f"exit {child.exitcode}"
            if error:
                failures[name] = error
    finally:
        sys.modules.update(loaded)
    assert failures == {}


def test_the_architecture_page_lists_every_layer_as_declared_here():
    """docs/architecture.md's layer table names each module and package once, at its layer here."""
    page = (SRC.parent / "docs" / "architecture.md").read_text()
    documented = {
        name: int(rank)
        for rank, cells in re.findall(r"^\| (\d+) \| ([^|]+) \|", page, re.M)
        for name in re.findall(r"`(\w+)(?:\.py|/)`", cells)
    }
    assert documented == RANK
