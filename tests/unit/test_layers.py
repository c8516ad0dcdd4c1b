"""The package tree is the architecture (docs/architecture.md): layers import only downwards,
and no module imports itself back through another. Read from the source with ``ast``, so a
new module is checked the day it is written."""

from __future__ import annotations

import ast
from pathlib import Path

import hive

ROOT = Path(hive.__file__).parent

#: Each layer, lowest first; a module may import its own layer and those below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "hive",
            "hive.config",
            "hive.device_models",
            "hive.device_models",
            "hive.engine_config",
            "hive.errors",
            "hive.models",
            "hive.validation",
            "hive.timeouts",
            "hive.addresses",
            "hive.device_models",
            "hive.engine_config",
            "hive.tlsfiles",
        ),
    ),
    ("host", ("hive.host",)),
    ("devices", ("hive.devices",)),
    ("state", ("hive.state",)),
    ("upstream", ("hive.upstream",)),
    ("workers", ("hive.workers",)),
    ("desired", ("hive.desired",)),
    ("context", ("hive.context", "hive.startup")),
    ("api", ("hive.api",)),
    ("daemon", ("hive.daemon",)),
]
#: Beside the stack: the client speaks to a hive over HTTP and needs only the wire shapes; the
#: CLI sits on top of everything; the demo worker is a separate program.
SIDE: dict[str, tuple[str, ...]] = {
    "hive.client": ("base", "client"),
    "hive.demo_worker": ("hive", "hive.demo_worker"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """What ``path`` imports from hive when it runs (``if TYPE_CHECKING:`` blocks left out)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "hive")
            elif (
                isinstance(child, ast.ImportFrom)
                and child.module
                and child.level == 0
                and child.module.split(".")[0] == "hive"
            ):
                for alias in child.names:  # `from hive.api import views` is a module
                    candidate = f"{child.module}.{alias.name}"
                    found.add(candidate if candidate in MODULES else child.module)
            visit(child)

    visit(tree)
    return found


MODULES = {module_name(p) for p in ROOT.rglob("*.py")}


def layer_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "hive" and module.startswith(prefix + ".")):
                return rank
    return None


def test_every_module_has_a_place() -> None:
    homeless = [
        m
        for m in MODULES
        if layer_of(m) is None
        and not m.startswith(("hive.cli", "hive.client", "hive.demo_worker"))
        and m != "hive.__main__"
    ]
    assert homeless == [], "add these modules to a layer in docs/architecture.md and here"


def test_layers_import_only_downwards() -> None:
    upward = []
    for path in ROOT.rglob("*.py"):
        module = module_name(path)
        rank = layer_of(module)
        for target in imports(path):
            if module.startswith("hive.client"):
                allowed = layer_of(target) == 0 or target.startswith("hive.client")
            elif module.startswith("hive.demo_worker"):
                allowed = target == "hive" or target.startswith("hive.demo_worker")
            elif rank is None:  # the CLI and __main__: on top of everything
                continue
            else:
                target_rank = layer_of(target)
                allowed = target_rank is not None and target_rank <= rank
            if not allowed:
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_no_import_cycle() -> None:
    graph = {module_name(p): imports(p) & MODULES for p in ROOT.rglob("*.py")}
    for package in [m for m in MODULES if (ROOT.parent / m.replace(".", "/")).is_dir()]:
        graph[package] = graph.get(package, set())
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == module or target == "hive":
                continue
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert cycles == []


def test_no_caller_marks_the_journal() -> None:
    """Issue 24: the journal hears every change from the registry; nobody pokes it by hand."""
    callers = [
        f"{module_name(p)}:{n}"
        for p in ROOT.rglob("*.py")
        if p.name != "journal.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "journal.mark(" in line
    ]
    assert callers == []
