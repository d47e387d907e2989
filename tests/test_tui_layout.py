"""bcdtui's house rules, read from the source: imports from bcdcore only recipe, rundir and the scheduler; no
import cycles inside bcdtui; no private names imported across modules; every file under 400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

ALLOWED = {"bcdcore.recipe", "bcdcore.rundir", "bcdcore.scheduler"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / "bcdtui").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def test_bcdtui_imports_only_recipe_rundir_and_the_scheduler_from_bcdcore():
    for name, path in modules().items():
        used = {m for m, _ in imports(path) if m.split(".")[0] == "bcdcore"}
        assert used <= ALLOWED, f"{name} imports {sorted(used - ALLOWED)}"


def test_no_private_names_across_modules():
    for name, path in modules().items():
        for module, names in imports(path):
            if module.split(".")[0] in ("bcdtui", "bcdcore"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{name} imports {private} from {module}"


def test_no_import_cycles_in_bcdtui():
    mods = modules()
    graph = {name: {m for m, _ in imports(path) if m in mods and m != name} for name, path in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in graph[name]:
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path[path.index(dep):] + [dep]) \
                if dep in path else f"import cycle through {dep}"
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_every_bcdtui_file_is_under_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) >= 400}
    assert not long, long
