"""Layering of the library: no import cycles between vidistill's modules, and the data layer takes its
exception class from `vidistill.errors`, not from the stage configurations.

Imports are read from the source (AST), lazy ones inside functions included; imports under
`if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "vidistill").rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """module -> the vidistill modules it imports (a name imported from a package counts as its submodule
    when there is one)."""
    mods = _modules()

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[m] |= {resolve(a.name) for a in node.names if a.name.startswith("vidistill")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vidistill"):
                graph[m] |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        graph[m] -= {m, ""}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_between_library_modules():
    graph = import_graph()
    assert "vidistill.distill.base" in graph["vidistill.config"] or "vidistill.distill" in graph["vidistill.config"]
    assert cycles(graph) == [], "import cycles (lazy imports included)"


def test_distillation_methods_and_the_data_layer_do_not_need_the_stage_configs_for_errors():
    graph = import_graph()
    for module in ("vidistill.distill.base", "vidistill.distill.kd", "vidistill.distill.d3d", "vidistill.distill.sd",
                   "vidistill.data.dataset", "vidistill.data.pace", "vidistill.train.loop"):
        assert "vidistill.config" not in graph[module], f"{module} imports vidistill.config"
