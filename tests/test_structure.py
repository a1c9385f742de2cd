"""The module structure: no import cycles inside duohead (lazy, function-level imports included), and the
leaf modules that describe models and write files import nothing else of duohead."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "duohead"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The duohead modules a file imports anywhere in it: `from duohead.x import y` is module duohead.x.y if that
    exists, else duohead.x (a package's __init__ that Python runs first for any submodule is not counted)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: imported_modules(path, known) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else path + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_module_imports_one_that_imports_it():
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_leaf_modules_import_no_other_duohead_module():
    graph = import_graph()
    for leaf in (
        "duohead.architecture",
        "duohead.files",
        "duohead.accounting",
        "duohead.kernels.streaming_view",
        "duohead.kernels.backends",
    ):
        assert graph[leaf] == set(), f"{leaf} imports {graph[leaf]}"


def test_the_vllm_plugin_is_an_outer_layer():
    """duohead.vllm (imported by vLLM through its entry point) uses the library; nothing of the library imports it,
    so duohead runs where vLLM is not installed."""
    graph = import_graph()
    for module, imports in graph.items():
        if not module.startswith("duohead.vllm"):
            assert not {name for name in imports if name.startswith("duohead.vllm")}, f"{module} imports the vLLM plugin"


def test_the_commands_are_an_outer_layer():
    """duohead.commands (the `duohead` command line) uses the library; no module of the library imports a command."""
    graph = import_graph()
    for module, imports in graph.items():
        if not module.startswith("duohead.commands") and module != "duohead.__main__":
            assert not {name for name in imports if name.startswith("duohead.commands")}, f"{module} imports a command module"


def test_no_module_is_named_after_the_standard_library():
    import sys

    names = {module.rsplit(".", 1)[-1] for module in import_graph()}
    assert not names & set(sys.stdlib_module_names) - {"__main__"}, names & set(sys.stdlib_module_names)
