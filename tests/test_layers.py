"""The package's layers: every import in src/loraprune (at module level or inside a function) goes
down, never up, and no two modules import each other, directly or through others.

Layers, lowest first (docs/architecture.md): the base (errors, config, archs), runtime/, pipeline/
(the method, one step a module), tasks, tools/, then the entry points (plan, pruning, settings, job, cli).
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "loraprune"
# a module's layer is the first entry whose prefix names it; lower numbers may not import higher ones
LAYERS = [
    ("loraprune.errors", 0),
    ("loraprune.prune_config", 0),
    ("loraprune.archs", 0),
    ("loraprune.runtime", 1),
    ("loraprune.pipeline", 2),
    ("loraprune.tasks", 3),
    ("loraprune.tools", 4),
    ("loraprune.plan", 5),
    ("loraprune.pruning", 5),
    ("loraprune.run_settings", 5),
    ("loraprune.job", 6),
    ("loraprune.cli", 7),
    ("loraprune.__main__", 8),
    ("loraprune", 8),  # the package's __init__: the public names, from every layer
]


def module_name(path: Path, root: Path = SRC.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = SRC.parent) -> set[str]:
    """Every loraprune module `path` (a file under `root`) imports, wherever the import statement stands."""
    name, found = module_name(path, root), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("loraprune")}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
            target = ".".join([*base, node.module] if node.module else base) if node.level else node.module or ""
            if not target.startswith("loraprune"):
                continue
            for alias in node.names:  # `from .pipeline import scoring` imports a module
                sub = f"{target}.{alias.name}"
                found.add(sub if (root / (sub.replace(".", "/") + ".py")).exists() else target)
    return found - {name}


GRAPH = {module_name(p): imports(p) for p in SRC.rglob("*.py")}


def layer(module: str) -> int:
    return next(level for prefix, level in LAYERS if module == prefix or module.startswith(prefix + "."))


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    found = upward(module, GRAPH[module])
    assert not found, f"{module} (layer {layer(module)}) imports from above: {found}"


def upward(module: str, targets: set[str]) -> list[str]:
    return sorted(m for m in targets if layer(m) > layer(module))


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_an_upward_import_is_caught(tmp_path):
    """The checker itself, on a package where pipeline/ imports tasks inside a function, and a
    module imports a sibling module by `from . import`."""
    package = tmp_path / "loraprune"
    (package / "pipeline").mkdir(parents=True)
    (package / "tasks.py").write_text("")
    (package / "pipeline" / "scoring.py").write_text("")
    probe = package / "pipeline" / "data.py"
    probe.write_text("from . import scoring\n\ndef f():\n    from ..tasks import TASKS\n")
    found = imports(probe, tmp_path)
    assert found == {"loraprune.tasks", "loraprune.pipeline.scoring"}
    assert upward(module_name(probe, tmp_path), found) == ["loraprune.tasks"]
