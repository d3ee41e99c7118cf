"""The package is layered: every import points down (no cycles), and the readers start without the trainer stack.

The import graph is built with the standard library's `ast` only: every `import` of a `trl_select` module counts,
at module level or inside a function, except those under `if TYPE_CHECKING:` (annotations only, never executed).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trl_select.event import SelectionEvent
from trl_select.history import SelectionHistory
from trl_select.score_files import score_file_path, write_score_file


PACKAGE_DIR = Path(__file__).resolve().parent.parent / "trl_select"
PACKAGE = "trl_select"
HEAVY = ("torch", "trl", "transformers")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The `trl_select` modules that `module` imports, anywhere in its code but under `if TYPE_CHECKING:`."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        # `from . import x` may name a module or an attribute; the longest existing module prefix is what is loaded
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    target = resolve(alias.name)
                    if target:
                        found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == PACKAGE or source.startswith(PACKAGE + "."):
                for alias in node.names:
                    target = resolve(f"{source}.{alias.name}")
                    if target:
                        found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    """`{module: the trl_select modules it imports}` for every module of the package."""
    paths = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    return {
        _module_name(path): _imports(
            ast.parse(path.read_text(), filename=str(path)), _module_name(path), path.name == "__init__.py", modules
        )
        for path in paths
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as `[a, b, ..., a]`, or `None` if the graph is acyclic (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import x\ndef f():\n    from .c import y\n"
    )
    assert _imports(tree, "trl_select.a", False, {"trl_select.a", "trl_select.b", "trl_select.c"}) == {"trl_select.c"}


def test_the_package_imports_have_no_cycle():
    graph = import_graph()
    assert {"trl_select.engine", "trl_select.callback", "trl_select.trainer", "trl_select.score_files"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_layers_point_down():
    graph = import_graph()
    # The pure layer and the file formats import nothing above them.
    for module in ("event", "rules", "history", "compute", "score_files", "pair_files"):
        assert graph[f"trl_select.{module}"] <= {"trl_select.rules", "trl_select.event", "trl_select.history"}, module
    assert "trl_select.registry_builtins" not in graph["trl_select.registry"]
    for module in ("engine", "callback", "reporting", "plots", "suspects", "score_files"):
        assert "trl_select.trainer" not in graph[f"trl_select.{module}"], module
        assert "trl_select.cli" not in graph[f"trl_select.{module}"], module
    assert "trl_select.callback" not in graph["trl_select.engine"]


def _loaded_after(code: str) -> list[str]:
    """The heavy packages loaded once `code` has run in a fresh interpreter."""
    check = f"{code}\nimport json, sys\nprint(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import trl_select",
        "import trl_select.plots",
        "import trl_select.suspects",
        "import trl_select.suspects_report",
        "import trl_select.reporting",
        "from trl_select import read_score_file, read_score_files, find_suspects, read_history",
        "import trl_select.cli",
    ],
)
def test_readers_load_neither_trl_nor_torch(code):
    assert _loaded_after(code) == []


def test_trl_select_plot_loads_neither_trl_nor_torch(tmp_path):
    keep = np.arange(6) % 2 == 0
    event = SelectionEvent(
        epoch=1,
        global_step=3,
        kind="selection",
        rule="irm_band",
        pair_ids=list(range(6)),
        keep=keep,
        scores={"irm": np.linspace(-1.0, 1.0, 6)},
    )
    write_score_file(score_file_path(tmp_path, 1), event, keep.astype(np.int32) + 1)
    history = SelectionHistory(tmp_path)
    history.append({"epoch": 0, "event": "warmup", "global_step": 0, "pool_size": 6, "num_selected": 6, "rule": "irm_band",
                    "thresholds": {}, "selected_ids": list(range(6)), "trimmed_ids": []})  # fmt: skip
    history.append({"epoch": 1, "event": "selection", "global_step": 3, "pool_size": 6, "num_selected": 3,
                    "rule": "irm_band", "thresholds": {}, "selected_ids": [0, 2, 4], "trimmed_ids": []})  # fmt: skip
    code = f"import sys\nfrom trl_select.cli import main\nassert main(['plot', {str(tmp_path)!r}]) == 0"
    assert _loaded_after(code) == []
    assert (tmp_path / "selection_plots" / "selection_overview.png").is_file()
