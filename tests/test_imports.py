"""The import graph of the speedtune package, function-level (lazy) imports included: no cycles, and no module
reaches into a verb's CLI module (shared options live in speedtune.commands.options)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent / "speedtune"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """The speedtune modules `path` imports anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n in MODULES)
    return out


GRAPH = {m: imports(p) - {m} for m, p in MODULES.items()}


def test_the_walk_sees_lazy_imports():
    assert "speedtune.training.trainer" in GRAPH["speedtune.training.train"]  # imported inside train()
    assert "speedtune.training.backends.unsloth_backend" in GRAPH["speedtune.training.backends"]


def test_no_import_cycles():
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(GRAPH[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_a_verbs_cli_module_or_its_command():
    for m, path in MODULES.items():
        assert "speedtune.commands.data" not in GRAPH[m] or m == "speedtune.cli", m
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("speedtune"):
                assert "command" not in [a.name for a in node.names], f"{m} imports {node.module}.command"
