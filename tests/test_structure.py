"""The package's shape: imports go one way (no circle), no module past about 450 lines, and package imports
inside functions only in the CLI (where they keep `--help` fast)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "clt_lite"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _targets(node: ast.Import | ast.ImportFrom, path: Path, known: set[str]) -> list[str]:
    """The clt_lite modules one import statement of `path` brings in (`from . import data` names the module data)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([node.module] if node.module else []))
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    return [t for t in targets if t in known and t != name]


def _graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """module -> the modules it imports; module -> the modules it imports inside a function."""
    modules = _modules()
    graph, local = {}, {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        inside = {id(inner) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for inner in ast.walk(node)}
        imports = [(t, id(node) in inside) for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for t in _targets(node, path, set(modules))]
        graph[name] = {t for t, _ in imports}
        local[name] = sorted({t for t, in_function in imports if in_function})
    return graph, local


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_import_graph_has_no_circle():
    graph, _ = _graph()
    assert _cycle(graph) is None


def test_a_circle_is_found_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_past_the_size_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_package_imports_inside_functions_only_in_the_cli():
    _, local = _graph()
    assert {name: targets for name, targets in local.items() if targets and name != "clt_lite.cli"} == {}


def test_each_choice_is_declared_once_and_the_tables_agree_with_it():
    """The Literal types in clt_lite.choices are the one list of names; the tables keyed by them agree."""
    from clt_lite import choices, clt, devices, optim, parallel, sites

    assert set(devices.DTYPES) == set(choices.names(choices.DType))
    assert set(optim.RECIPES) == set(choices.names(choices.Optimizer))
    assert clt.ACTIVATIONS == choices.names(choices.Activation) and parallel.PARALLEL == choices.names(choices.Parallel)
    assert sites.INPUT_SITES == choices.names(choices.InputSite)
