"""The package's rooms stand above what they use and nothing points back up: checked on the source itself,
function-level imports included."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "swarmtune"
ENTRY_POINTS = ("swarmtune.train", "swarmtune.generate", "swarmtune.eval", "swarmtune.launch")
# room -> what it must never import
FORBIDDEN = {
    "adapters": ("swarmtune.client", "swarmtune.server", "swarmtune.tuning", "swarmtune.transport",
                 "swarmtune.directory", *ENTRY_POINTS),
    "server": ("swarmtune.client", "swarmtune.tuning", *ENTRY_POINTS),
    "client": ("swarmtune.server", "swarmtune.tuning", *ENTRY_POINTS),
    "models": ("swarmtune.client", "swarmtune.server", "swarmtune.tuning", "swarmtune.adapters", *ENTRY_POINTS),
    "transport.py": ("swarmtune.client", "swarmtune.server", "swarmtune.tuning"),
    "directory.py": ("swarmtune.client", "swarmtune.server", "swarmtune.tuning"),
    "tuning": ("swarmtune.server", *ENTRY_POINTS),
}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, resolved to absolute names."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[:-node.level]
                base = ".".join([*parent, base] if base else parent)
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def sources(room: str) -> list[Path]:
    target = PACKAGE / room
    return [target] if target.is_file() else sorted(target.rglob("*.py"))


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_do_not_import_what_stands_above_them(room):
    bad = {f"{path.relative_to(PACKAGE)} imports {name}" for path in sources(room) for name in imports(path)
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[room])}
    assert not bad, sorted(bad)


def test_every_class_name_means_one_thing():
    where = collections.defaultdict(list)
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                where[node.name].append(str(path.relative_to(PACKAGE)))
    assert not {name: files for name, files in where.items() if len(files) > 1}


def module_graph() -> dict[str, set[str]]:
    """swarmtune module -> the swarmtune modules it imports (a `from package import submodule` names the submodule,
    not the package)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        found = imports(path)
        graph[name] = {m for m in found if m in modules and m != name
                       and not any(other.startswith(m + ".") and other in modules for other in found)}
    return graph


def test_no_module_imports_itself_back():
    """No import cycles, function-level imports included: a cycle means two rooms each need the other, which a
    newcomer cannot read one at a time (and a lazy import hides it until a call in the wrong order)."""
    graph = module_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                cycles.append(" -> ".join(path[path.index(other):] + [other]))
            elif other not in state:
                visit(other, path + [other])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
