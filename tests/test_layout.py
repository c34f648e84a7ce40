"""The house rules of the package, checked on its source: one-way imports, one owner per concern."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "dstrain"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules ``path`` imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_nothing_outside_train_imports_the_trainer_package():
    offenders = {
        name: sorted(i for i in imports(path) if i == "dstrain.train" or i.startswith("dstrain.train."))
        for name, path in modules().items()
        if not name.startswith("dstrain.train")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_only_distributed_imports_horovod_or_mpi():
    users = {
        name for name, path in modules().items() if any(i.split(".")[0] in ("horovod", "mpi4py") for i in imports(path))
    }
    assert users and all(u.startswith("dstrain.distributed.") for u in users), users


def test_only_the_loader_constructs_a_plan_reader():
    places = [
        p for p in [*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").glob("*.py")] if "PlanReader(" in p.read_text()
    ]
    assert places and all(p.parent == PACKAGE / "loader" for p in places), places


def test_module_level_imports_have_no_cycles():
    mods = modules()
    graph = {
        name: {i for i in imports(path, top_level_only=True) if i in mods and i != name} for name, path in mods.items()
    }
    # A package's __init__ importing its own submodules is how packages re-export; it is not a cycle of the design.
    for name in graph:
        graph[name] = {i for i in graph[name] if not i.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
