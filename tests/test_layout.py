"""The package's layout rules: no module in `dclip/` over 400 lines, no function there (or in the remote code) over 60
lines, and no import cycle among `dclip` modules (imports read from the source with `ast`, relative and absolute, at
module level and inside functions alike)."""

from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "dclip"
MAX_LINES = 400
MAX_FUNCTION_LINES = 60
REMOTE_CODE = ("configuration_dclip.py", "modeling_dclip.py", "processing_dclip.py")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its `__init__.py`)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` (at `path`) imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def known(dotted: str) -> str | None:  # the module itself, or the innermost known package holding it
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(known(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule, else pkg itself
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else known(source))
    return {module for module in found if module and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A cycle through `component` (a strongly connected set), as `[a, b, ..., a]`."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first from `start` inside the component, until an edge returns to it
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    following.append(child)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def test_no_module_over_the_line_limit():
    lengths = {path.relative_to(PACKAGE.parent).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
               for path in module_files().values()}
    too_long = {path: lines for path, lines in lengths.items() if lines > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_no_function_over_the_line_limit():
    files = list(module_files().values()) + [PACKAGE.parent / name for name in REMOTE_CODE]
    too_long = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long[f"{path.relative_to(PACKAGE.parent).as_posix()}:{node.lineno} {node.name}"] = lines
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_no_import_cycle():
    graph = import_graph()
    assert "dclip.evaluation.checkpoint" in graph and graph["dclip.evaluation.checkpoint"]  # the graph sees the package
    cycles = [" -> ".join(one_cycle(graph, component)) for component in strongly_connected(graph)
              if len(component) > 1]
    assert not cycles, "import cycles among dclip modules:\n" + "\n".join(cycles)


def test_the_graph_resolves_every_kind_of_import():
    """The resolution rules on the real package: relative, absolute, from-a-package, inside a function."""
    graph = import_graph()
    assert "dclip.evaluation.retrieval" in graph["dclip.evaluation.teacher"]  # from .retrieval import ...
    assert "dclip.targets" in graph["dclip.evaluation.teacher"]  # from ..targets import ..., inside a function
    assert "dclip.data.loaders" in graph["dclip.data.loading"]  # from .loaders import ..., inside a function
    assert "dclip.evaluation" in graph["dclip.curation.curate"]  # from ..evaluation import ... (a package's __init__)
    assert {"dclip.evaluation.checkpoint", "dclip.evaluation.retrieval"} <= graph["dclip.evaluation"]
    assert "dclip.evaluation" not in graph["dclip.evaluation.checkpoint"]  # a sibling import is not the package's


def test_a_cycle_is_found_and_printed():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    (component,) = [c for c in strongly_connected(graph) if len(c) > 1]
    assert component == {"a", "b", "c"} and one_cycle(graph, component) == ["a", "b", "c", "a"]


def test_ruff_passes():
    """The ruff configuration in pyproject.toml holds for the whole checkout (`ruff check .`)."""
    import shutil
    import subprocess

    import pytest

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the [dev] extra)")
    completed = subprocess.run([ruff, "check", "."], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert completed.returncode == 0, completed.stdout[-3000:]
