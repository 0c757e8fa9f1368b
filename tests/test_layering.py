"""The layering rules of the package, read from the source (no import is executed):

- `pixart.nn` (portable layers) imports only `pixart.backend` and itself, and `pixart.models` never imports
  `pixart.cpu` (the CPU speed work is applied to built models from above, by `pixart.cpu.accelerate`);
- the module-level imports among `pixart` modules have no cycle.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pixart"


def _modules() -> dict[str, Path]:
    """Every importable module of the package by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if any("-" in p for p in parts):  # pixart/lora-finetuning: scripts, not modules
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imported(name: str, node) -> list[str]:
    """The pixart modules an Import / ImportFrom node of module `name` names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "pixart"]
    if node.level:  # relative: from the module's package, `level` steps up
        base = name.split(".") if _is_package(name) else name.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "pixart":
        return []
    names = [f"{target}.{a.name}" for a in node.names]  # `from pixart import cpu`: the module pixart.cpu
    return [target] + [n for n in names if n in MODULES]


def _imports(name: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # statements at module level, also inside a top-level try / if
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    found = set()
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(m for m in _imported(name, node) if m in MODULES)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_portable_layers_and_models_never_import_the_cpu_package():
    offenders = {name: sorted(m for m in _imports(name, top_level_only=False) if _within(m, "pixart.cpu"))
                 for name in MODULES if _within(name, "pixart.models") or _within(name, "pixart.nn")}
    assert not {k: v for k, v in offenders.items() if v}


def test_portable_layers_import_only_the_backend():
    allowed = ("pixart.backend", "pixart.nn", "pixart")
    offenders = {name: sorted(m for m in _imports(name, top_level_only=False)
                              if not any(m == a or _within(m, a) and a != "pixart" for a in allowed))
                 for name in MODULES if _within(name, "pixart.nn")}
    assert not {k: v for k, v in offenders.items() if v}
    assert any(_within(name, "pixart.nn") for name in MODULES)


def _graph() -> dict[str, set[str]]:
    """Module -> the modules its module-level imports run: each named module and the packages above it, except the
    importing module's own packages (already being imported when it runs)."""
    graph = {}
    for name in MODULES:
        edges = set()
        for target in _imports(name, top_level_only=True):
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                above = ".".join(parts[:i])
                if above in MODULES and not name.startswith(above + "."):
                    edges.add(above)
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None
    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles_among_pixart_modules():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
