"""The package's layers: no module imports a module of a higher layer, and no import cycle.

Imports are read with ``ast`` from every module under src/affinage, at module level and inside
functions alike (an in-function import hides a dependency from import-time errors, not from the
design); relative imports are resolved. An import names the deepest module it reaches
(``from affinage.data.template import x`` -> ``affinage.data.template``), as
``/work/shared/tools/import-cycles`` counts them.

The two exception sets only shrink: an entry that no longer occurs fails the test, so whoever
removes an upward import or a cycle also removes its entry.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "affinage"
SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. An entry names a module and its submodules; one ending in "*" is a name prefix
# (``affinage.export*``: export and its submodules); the most specific entry that
# matches decides a module's layer. The package root ``affinage`` (its __init__) is only itself.
# A module may import modules of its own layer or of lower ones.
LAYERS: list[list[str]] = [
    # foundations: errors, atomic writes, the cache directory, user functions, the process group, threads and device,
    # tensors backward recomputes, whether a module's weights may be used without calling it
    [
        "affinage.errors",
        "affinage.atomic",
        "affinage.cache",
        "affinage.userfn",
        "affinage.distributed",
        "affinage.runtime",
        "affinage.recompute",
        "affinage.module_hooks",
    ],
    # rows and their text (the config validates template names against data.template)
    [
        "affinage.data.formats",
        "affinage.data.template",
        "affinage.data.dedup",
        "affinage.data.split",
        "affinage.data.transforms",
        "affinage.data.batching",
    ],
    # Ludwig's and mlx-lm's spellings, translated before the schema validates
    ["affinage.ludwig", "affinage.mlx", "affinage.constraint_config", "affinage.config_sections", "affinage.config"],
    # the data of a config (affinage.data's __init__), prompting, inference rows, checks, the split command
    ["affinage.data"],
    ["affinage.models", "affinage.models.quantize", "affinage.training.gated_mlp"],
    ["affinage.lora"],
    ["affinage.training.prefix_cache", "affinage.training"],
    # measuring a model, and the task a run learns
    ["affinage.evaluate", "affinage.evaluate.patterns", "affinage.evaluate.task"],
    # a run on disk (its layout), opened for use, and inference with it
    ["affinage.run_dir", "affinage.run", "affinage.runner"],
    # what is made from runs: exports, reports
    ["affinage.export", "affinage.report", "affinage.report.compare*", "affinage.report.plots"],
    # the recipe, which wires all of the above
    ["affinage.pipeline"],
    # benchmarks: the recipe and its parts against peers (time to quality runs the whole recipe)
    ["affinage.bench"],
    [
        "affinage.api",
        "affinage.ludwig_results",
        "affinage.ludwig_api",
        "affinage.upload",
        "affinage.cli_train",
        "affinage.cli",
        "affinage",
        "affinage.__main__",
    ],
]

# Upward imports still to remove, (importer, imported): none left.
KNOWN_UPWARD: set[tuple[str, str]] = set()

# Import cycles still to remove (strongly connected components of the import graph): none left.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = SRC) -> dict[str, Path]:
    return {_module_name(path, root): path for path in sorted((root / PACKAGE).rglob("*.py"))}


def _deepest(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` lives in: ``affinage.data.template.render_prompt`` -> ``affinage.data.template``."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(module: str, source: str, modules: dict[str, Path], is_package: bool) -> set[str]:
    """The package's modules that ``source`` (the module ``module``) imports, anywhere in its body."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from ..errors import y
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = _deepest(name, modules)
            # importing a module runs its parent packages' __init__ first: not counted, as the tool doesn't
            if target and target != module and not module.startswith(target + "."):
                found.add(target)
    return found


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    modules = _modules(root)
    return {
        module: imported_modules(module, path.read_text(encoding="utf-8"), modules, path.name == "__init__.py")
        for module, path in modules.items()
    }


def _matches(entry: str, module: str) -> bool:
    if entry.endswith("*"):
        return module.startswith(entry[:-1])
    return module == entry or (entry != PACKAGE and module.startswith(entry + "."))


def layer_of(module: str) -> int | None:
    """The layer of the most specific entry matching ``module`` (None: no entry does)."""
    matching = [
        (len(entry.rstrip("*")), index)
        for index, layer in enumerate(LAYERS)
        for entry in layer
        if _matches(entry, module)
    ]
    return max(matching)[1] if matching else None


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Tarjan's components with more than one module: the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_module_has_a_layer_and_every_entry_a_module(graph):
    assert [module for module in graph if layer_of(module) is None] == []
    entries = [entry for layer in LAYERS for entry in layer]
    assert len(entries) == len(set(entries)), "an entry is listed twice"
    assert [entry for entry in entries if not any(_matches(entry, module) for module in graph)] == []


def test_no_module_imports_a_higher_layer(graph):
    upward = {
        (importer, imported)
        for importer, targets in graph.items()
        for imported in targets
        if layer_of(imported) > layer_of(importer)
    }
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, (
        f"upward imports (importer, imported): {new}. Import from a lower layer (move the shared piece "
        "down), or, if the layers themselves are wrong, change LAYERS"
    )
    gone = sorted(KNOWN_UPWARD - upward)
    assert not gone, f"these upward imports are gone: delete them from KNOWN_UPWARD: {gone}"


def test_no_import_cycle(graph):
    cycles = set(strongly_connected(graph))
    new = sorted(sorted(cycle) for cycle in cycles - KNOWN_CYCLES)
    assert not new, f"import cycles: {new}. Move what both sides need into a module both can import"
    gone = sorted(sorted(cycle) for cycle in KNOWN_CYCLES - cycles)
    assert not gone, f"these cycles are gone: delete them from KNOWN_CYCLES: {gone}"


def test_the_parser_sees_relative_and_in_function_imports(tmp_path):
    package = tmp_path / PACKAGE
    (package / "data").mkdir(parents=True)
    for name in ("__init__.py", "errors.py", "config.py", "data/__init__.py", "data/formats.py"):
        (package / name).write_text("")
    (package / "data" / "template.py").write_text(
        "from . import formats\n"
        "def f():\n"
        "    from ..errors import ConfigError\n"
        "    import affinage.config as config\n"
        "    from os import path\n"
    )
    (package / "data" / "__init__.py").write_text("from .template import f\n")
    graph = import_graph(tmp_path)
    assert graph["affinage.data.template"] == {"affinage.data.formats", "affinage.errors", "affinage.config"}
    assert graph["affinage.data"] == {"affinage.data.template"}


def test_a_new_upward_import_or_cycle_is_found():
    graph = {
        "affinage.errors": {"affinage.config"},
        "affinage.config": {"affinage.errors"},
        "affinage.cli": set(),
    }
    assert layer_of("affinage.config") > layer_of("affinage.errors")
    assert layer_of("affinage.report.render") == layer_of("affinage.report.compare") > layer_of("affinage.run")
    assert layer_of("affinage.data.check") == layer_of("affinage.data") > layer_of("affinage.data.template")
    assert layer_of("affinage") == layer_of("affinage.cli") and layer_of("affinage.nothing") is None
    assert strongly_connected(graph) == [frozenset({"affinage.errors", "affinage.config"})]
