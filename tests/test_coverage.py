"""The default tier (`pytest -q`, slow tests left out) still reaches every module of the package.

Checked on the source: a module is reached when a default-tier test file imports it (at its top, or in a
function that is not a slow test), names it as a string (`run("swarmtune.train", ...)`, `-m swarmtune.dht`:
run as a process), or when a module reached so does the same. A package run with `-m` reaches its
`__main__`."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "swarmtune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def is_slow(node: ast.AST) -> bool:
    return any(ast.unparse(d).endswith("mark.slow") for d in getattr(node, "decorator_list", []))


def named(tree: ast.AST) -> set[str]:
    """Modules of the package named by string constants (a module run as a process), with their `__main__`."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in MODULES:
            found |= {node.value, f"{node.value}.__main__"}
    return found


def references(path: Path, skip_slow: bool = False) -> set[str]:
    """Modules of the package that `path` imports or names, leaving out (with `skip_slow`) what only its slow
    tests do."""
    tree = ast.parse(path.read_text())
    if skip_slow:
        if any(isinstance(n, ast.Assign) and "pytestmark" in ast.unparse(n) and "slow" in ast.unparse(n)
               for n in tree.body):
            return set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and is_slow(node):
                node.body = [ast.Pass()]
    module = module_name(path) if path.is_relative_to(PACKAGE) else path.stem
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package (a package's __init__ is its own package)
                package = module.split(".")[:len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*package, base] if base else package)
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found | named(tree) if m in MODULES}


def test_the_default_tier_reaches_every_module():
    reached = set().union(*(references(path, skip_slow=True) for path in TESTS.glob("*.py")))
    frontier = set(reached)
    while frontier:
        module = frontier.pop()
        for parent in (module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)):
            if parent not in reached:  # importing a.b.c runs a/__init__ and a/b/__init__
                reached.add(parent)
                frontier.add(parent)
        for found in references(MODULES[module]) - reached:
            reached.add(found)
            frontier.add(found)
    assert not set(MODULES) - reached, sorted(set(MODULES) - reached)


def test_a_module_only_a_slow_test_reaches_is_not_counted(tmp_path):
    test = tmp_path / "test_probe.py"
    test.write_text("import pytest\n\n@pytest.mark.slow\ndef test_x():\n    import swarmtune.tiny_model\n"
                    "    run('swarmtune.dht')\n")
    assert references(test, skip_slow=True) == set()
    assert references(test) == {"swarmtune.tiny_model", "swarmtune.dht"}
