"""No module of the repository takes part in an import cycle.

The graph is grimp's (import-linter's) over every package of the repository. It holds
every import grimp sees: module-level ones, the lazy ones inside functions, and those
under ``if TYPE_CHECKING:`` (a cycle of annotations is still two modules that need each
other). A backend that must be chosen at run time is imported by a module above both it
and the interface it implements (``client.runtime.backend``), never by the interface.

grimp records the modules an import names, not the package ``__init__`` that Python runs
first: ``from a.b import x`` is an edge to ``a.b`` alone. A package's ``__init__`` that
re-exports its submodules is an edge to each of them, so importing a name from the
package (``from a import x``) is checked as the import of every submodule it loads.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "delta_packager", "simulation", "fedota", "protocol")

Graph = dict[str, tuple[str, ...]]


def _import_graph(monkeypatch: pytest.MonkeyPatch) -> tuple[grimp.ImportGraph, Graph]:
    monkeypatch.syspath_prepend(str(REPO))  # this checkout, whatever is installed
    present = [p for p in PACKAGES if (REPO / p / "__init__.py").is_file()]
    graph = grimp.build_graph(*present, cache_dir=None)
    edges = {m: tuple(sorted(graph.find_modules_directly_imported_by(m))) for m in graph.modules}
    return graph, edges


def _strongly_connected(edges: Graph) -> list[list[str]]:
    """Tarjan's components with more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges.get(root, ())))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(edges.get(nxt, ()))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
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
    return found


def _shortest_cycle(start: str, component: set[str], edges: Graph) -> list[str]:
    """The shortest path ``start → … → start`` inside one component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in edges.get(node, ()):
                if nxt not in component or nxt in previous:
                    continue
                previous[nxt] = node
                if nxt == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(previous[path[-1]])
                    return path[::-1]
                following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is not on a cycle of its component")


def _describe(cycle: list[str], graph: grimp.ImportGraph) -> str:
    steps = []
    for importer, imported in itertools.pairwise(cycle):
        details = graph.get_import_details(importer=importer, imported=imported)
        where = ", ".join(f"line {d['line_number']}: {d['line_contents']}" for d in details)
        steps.append(f"  {importer} -> {imported} ({where})")
    return "\n".join(steps)


def test_no_import_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    graph, edges = _import_graph(monkeypatch)
    present = {m.split(".")[0] for m in edges}
    assert present == set(PACKAGES), f"the graph lacks {sorted(set(PACKAGES) - present)}"
    problems = []
    for component in _strongly_connected(edges):
        cycle = _shortest_cycle(component[0], set(component), edges)
        problems.append(
            f"{len(component)} modules import each other: {', '.join(component)}\n"
            f"one cycle:\n{_describe(cycle, graph)}"
        )
    assert not problems, "\n\n".join(problems)


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges: Graph = {"a": ("b",), "b": ("c",), "c": ("a", "d"), "d": (), "e": ("e2",), "e2": ()}
    assert _strongly_connected(edges) == [["a", "b", "c"]]
    assert _shortest_cycle("a", {"a", "b", "c"}, edges) == ["a", "b", "c", "a"]
