"""The import structure: no import cycles between haltrace modules, and the layer contracts of pyproject.toml
(``[tool.importlinter]``, the same check as ``lint-imports`` in ``make test``).

grimp reads imports from the source, function-level ones included. Imports under ``if TYPE_CHECKING:`` are left
out of the cycle check: they never run, so they cannot make an import order fail (the contracts still count them).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: cycles tolerated while every module of a cycle is in one of these sets; none left.
KNOWN_CYCLES: dict[str, frozenset[str]] = {}


def _graph():
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter: pip install -e '.[dev]'")
    return grimp.build_graph("haltrace", exclude_type_checking_imports=True, cache_dir=None)


def _strongly_connected(graph) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the groups of modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                nxt = edges[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in edges[node]:
                    groups.append(sorted(group))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return groups


def _cycle_path(graph, group: list[str]) -> str:
    """One cycle through ``group``, each step with the line numbers of its imports."""
    first = group[0]
    second = next(m for m in sorted(graph.find_modules_directly_imported_by(first)) if m in group)
    chain = [first, *graph.find_shortest_chain(importer=second, imported=first)]
    steps = []
    for importer, imported in zip(chain, chain[1:], strict=False):
        lines = sorted({d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)})
        steps.append(f"{importer} -> {imported} (line {', '.join(map(str, lines))})")
    return "\n    ".join(steps)


def test_no_import_cycles_between_haltrace_modules():
    graph = _graph()
    cycles = [g for g in _strongly_connected(graph)
              if not any(set(g) <= known for known in KNOWN_CYCLES.values())]
    message = "\n".join(f"modules importing each other in a cycle: {', '.join(g)}\n    {_cycle_path(graph, g)}"
                        for g in cycles)
    assert not cycles, ("import cycles (function-level imports count; move the shared code into the lower "
                        "module):\n" + message)


def test_cycle_finder_sees_function_level_imports(tmp_path, monkeypatch):
    """A cycle closed only by an import inside a function is still found (the check above is not blind to it)."""
    grimp = pytest.importorskip("grimp")
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from cyclepkg import high\n    return high\n")
    (pkg / "high.py").write_text("from cyclepkg import low\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyclepkg", cache_dir=None)
    groups = _strongly_connected(graph)
    assert groups == [["cyclepkg.high", "cyclepkg.low"]]
    assert _cycle_path(graph, groups[0]) == ("cyclepkg.high -> cyclepkg.low (line 1)\n"
                                             "    cyclepkg.low -> cyclepkg.high (line 2)")


def test_layer_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter is a dev dependency: pip install -e '.[dev]'")
    code = ("import sys\nfrom importlinter.cli import lint_imports\n"
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"lint-imports found broken contracts:\n{proc.stdout}\n{proc.stderr}"


def test_data_sources_name_organism_modules_with_hooks():
    """The data-source registry names its sources (the layers below the organism never import it), so check
    here what the import graph cannot: each one imports, belongs to the organism, and offers a known hook."""
    import importlib

    from haltrace.data.sources import SOURCES

    hooks = ("fit_data_for", "probe_task_for", "world_for", "evaluate_world")
    assert SOURCES
    for name in SOURCES:
        module = importlib.import_module(name)
        assert name.startswith("haltrace.organism."), name
        assert any(callable(getattr(module, hook, None)) for hook in hooks), f"{name} defines none of {hooks}"
