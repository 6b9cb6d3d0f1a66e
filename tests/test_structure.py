"""The shape of the code: no import circle, no upward arrow the data flow does not need, and no
file too long to read in one sitting.  Imports are read from the source (every level, lazy ones
inside functions included), so the check needs nothing to run."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 450
# library and harness modules, named as they are imported (d2c.x.y, d2c_harness.x)
SOURCES = {REPO / "core": REPO / "core" / "d2c", REPO / "ablations": REPO / "ablations" / "d2c_harness"}


def _name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (`from a import b` names a.b when b is a module)."""
    files = {_name(p, base): p for base, top in SOURCES.items() for p in top.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        seen = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                seen.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                seen.add(base)
                seen.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {m for m in seen if m in files and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, out = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    graph = import_graph()
    assert {"d2c.sampling", "d2c.models.mar", "d2c_harness.cell"} <= set(graph)   # the reader sees the tree
    assert circles(graph) == []


def test_no_upward_arrows():
    """The generic file helpers live in d2c.files; the command-line contract does not pull in
    training; the head's fast paths do not import the model module they serve; the models read
    their SamplerConfig without importing it (d2c.sampling imports them)."""
    graph = import_graph()
    assert "d2c.train" not in graph["d2c.cli"]
    assert not {m for m in graph["d2c.kernels.head_sampling"] if m.startswith("d2c.models")}
    assert not {m for m in graph if m.startswith("d2c.models") and "d2c.sampling" in graph[m]}
    users = {m for m in graph if "d2c.checkpoint" in graph[m]}
    assert "d2c.results" not in users and "d2c.data.cache" not in users      # they write files, not weights


@pytest.mark.parametrize("folder", ["core", "ablations", "reports", "bench", "tests"])
def test_no_file_over_the_limit(folder):
    long = {str(p.relative_to(REPO)): n for p in (REPO / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
