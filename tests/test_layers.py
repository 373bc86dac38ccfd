"""The layers hold in the imports (read from the source, every import statement, also those
inside functions): core knows no algorithm and no engine; algorithms know no engine;
config knows no algorithm; eval knows no algorithm and no demo data; engines never import
the CLI; no module imports itself back through others; no file is much over 400 lines."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedtune"


def _module(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in SRC.rglob("*.py"):
        mod = _module(path)
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
        graph[mod] = {m for m in found if m.startswith("fedtune")}
    mods = set(graph)
    # keep only names that are modules (from X import name: name may be a function)
    return {m: {d for d in deps if d in mods and d != m} for m, deps in graph.items()}


GRAPH = _imports()


def _under(mod: str, *prefixes: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


RULES = [
    ("fedtune.core", ("fedtune.fedit", "fedtune.fedbpt", "fedtune.engines", "fedtune.cli", "fedtune.runner")),
    ("fedtune.fedit", ("fedtune.engines", "fedtune.cli", "fedtune.runner", "fedtune.fedbpt")),
    ("fedtune.fedbpt", ("fedtune.engines", "fedtune.cli", "fedtune.runner", "fedtune.fedit")),
    ("fedtune.config", ("fedtune.fedit", "fedtune.fedbpt", "fedtune.engines")),
    ("fedtune.config_schema", ("fedtune.fedit", "fedtune.fedbpt", "fedtune.engines", "fedtune.core")),
    ("fedtune.eval", ("fedtune.fedit", "fedtune.fedbpt", "fedtune.data.skills", "fedtune.engines")),
    ("fedtune.engines", ("fedtune.cli",)),
]


@pytest.mark.parametrize("layer,forbidden", RULES, ids=[r[0] for r in RULES])
def test_a_layer_imports_nothing_above_it(layer, forbidden):
    bad = sorted((m, d) for m, deps in GRAPH.items() if _under(m, layer) for d in deps if _under(d, *forbidden))
    assert not bad, bad


def test_no_import_cycles():
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            visit(d)
        stack.pop()

    for m in sorted(GRAPH):
        visit(m)
    # a package's __init__ importing its own submodule is not a cycle of two responsibilities
    real = [c for c in cycles if not all(_under(x, c[0]) or _under(c[0], x) for x in c)]
    assert not real, real


def test_no_file_is_much_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long
