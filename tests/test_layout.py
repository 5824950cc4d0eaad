"""The house's shape holds: phase folders that import only downward, no import circles, no module over
400 lines, and the entry's `run` on one screen in four phases."""

import ast
import inspect

from dpo_recipes import ROOT, train

PACKAGE = ROOT / "dpo_recipes"
# Bottom-up: a module may import its own floor and the floors below it, never one above
FLOORS = [
    "dpo_recipes",
    "errors",
    "console",
    "sources",
    "config",
    "rundir",
    "training",
    "memory",
    "after",
    "entry",
]
ENTRY = {"train", "validate", "launch", "cli"}


def name_of(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {name_of(path): path for path in PACKAGE.rglob("*.py")}


def floor(module: str) -> int:
    part = module.split(".")[1] if "." in module else module
    return FLOORS.index("entry" if part in ENTRY else part)


def imports(module: str) -> set[str]:
    """The package's modules `module` imports, anywhere in its body (`from a import b`: a.b where b is
    a module, else a)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dpo_recipes":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


def test_every_module_imports_only_its_own_floor_and_those_below():
    upward = [f"{m} -> {t}" for m in MODULES for t in imports(m) if floor(t) > floor(m)]
    assert not upward


def test_no_import_circles():
    graph = {module: imports(module) - {module} for module in MODULES}
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles


def test_no_module_is_over_400_lines():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "data_prep").glob("*.py")]
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in files}
    assert {path: n for path, n in sizes.items() if n > 400} == {}


def test_the_entry_runs_in_four_phases_on_one_screen():
    source = inspect.getsource(train.run)
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    called = [n.func.id for n in sorted(calls, key=lambda n: (n.lineno, n.col_offset))]
    assert called == ["prepare", "Path", "assemble", "train", "finish"] and len(source.splitlines()) <= 40
