"""The house's rules, measured from the code: imports point one way (no cycles), no private name is imported
across modules, bcdtui imports only recipe, rundir and the scheduler from bcdcore, and no source file grows
past 450 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bcdcore", "bcdtui")
MAX_LINES = 450
# what bcdtui may import from bcdcore (DESIGN "Module shape"); records/runfiles/runlock come through rundir
TUI_MAY_IMPORT = ("bcdcore.annotations", "bcdcore.recipe", "bcdcore.rundir", "bcdcore.records", "bcdcore.runfiles",
                  "bcdcore.runlock", "bcdcore.scheduler", "bcdcore.sweepfile")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path, name: str) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file, at any depth."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    typing_only = set()  # `if TYPE_CHECKING:` imports never run: they are annotations, not arrows
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for child in node.body for n in ast.walk(child))
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative import
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([module] if module else []))
            out.append((module, [a.name for a in node.names], node.lineno))
    return out


def _edges() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name that is itself a submodule counts as that module)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for module, names, _ in _imports(path, name):
            if module not in MODULES:
                continue
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            targets = subs if subs and len(subs) == len(names) else [module, *subs]
            graph[name].update(t for t in targets if t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_packages():
    assert {"bcdcore.recipe", "bcdcore.run", "bcdcore.data", "bcdcore.models", "bcdcore.measure",
            "bcdtui.app"} <= set(MODULES)
    assert "bcdcore.recipe" in _edges()["bcdcore.run.prepare"] or any(
        m.startswith("bcdcore.recipe") for m in _edges()["bcdcore.run.prepare"])


def test_no_import_cycles():
    assert _cycles(_edges()) == []


def test_a_planted_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_private_name_is_imported_across_modules():
    offences = []
    for name, path in MODULES.items():
        for module, names, line in _imports(path, name):
            if not module.startswith(PACKAGES) or module == name:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [part for part in module.split(".") if part.startswith("_") and part != "__main__"]
            if private:
                offences.append(f"{path.relative_to(REPO)}:{line} imports {', '.join(private)} from {module}")
    assert offences == []


def test_bcdtui_imports_only_recipe_rundir_and_the_scheduler_from_bcdcore():
    offences = []
    for name, path in MODULES.items():
        if not name.startswith("bcdtui"):
            continue
        for module, names, line in _imports(path, name):
            if module.startswith("bcdcore") and module != "bcdcore" and not module.startswith(TUI_MAY_IMPORT):
                offences.append(f"{path.relative_to(REPO)}:{line} imports {module}")
            if module == "bcdcore" and set(names) - {"recipe", "rundir", "scheduler"}:
                offences.append(f"{path.relative_to(REPO)}:{line} imports {names} from bcdcore")
    assert offences == []


SOURCES = sorted(p for folder in ("bcdcore", "bcdtui", "csrc", "bench")
                 for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".cpp", ".cu", ".h", ".sh", ".tcss"))


def test_every_bcdtui_file_is_under_400_lines():
    """The workstation keeps the stricter target: one screen per module, logic in plain classes."""
    over = {str(p.relative_to(REPO)): n for p in (REPO / "bcdtui").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert over == {}


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(REPO)) for p in SOURCES])
def test_no_source_file_is_over_450_lines(path):
    lines = len(path.read_text(errors="replace").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines; split it along its jobs"


def test_the_registries_serve_exactly_the_names_the_recipe_validates():
    """The recipe layer (no torch) lists the names a recipe may use; each registry has a builder for each."""
    from bcdcore.data import LOADERS
    from bcdcore.models import BUILDERS
    from bcdcore.recipe import DATASETS, MODELS

    assert set(BUILDERS) == set(MODELS)
    assert set(LOADERS) == set(DATASETS)
