"""Recipes as the workstation sees them: files under the recipes directory, live validation of editor text
through bcdcore's validator (with the offending line), templates, saving, overrides and sweep expansion into
launch plans. Pure Python: bcdcore.recipe is the only engine module used here (no torch)."""
from __future__ import annotations

import importlib.machinery
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from bcdcore.recipe import Recipe, RecipeError, expand_grid, parse_recipe, toml_value
from bcdcore.recipe import read_recipe_text as core_read_recipe_text
from bcdcore.recipe.plugin_keys import plugin_names
from bcdcore.recipe.schema import DATASETS
from bcdcore.rundir import RecordError, plain, printable
from bcdcore.scheduler import point_overrides

TEMPLATE = """\
# {name}: a new recipe. Keys and defaults: README "Recipe keys"; validate with `bcdcore check`.
[run]
name = "{name}"
seed = 0
device = "auto"          # "auto" | "cpu" | "cuda" | "cuda:N"
rounds = 30

[data]
name = "digits_flat"     # digits | digits_flat | diabetes | toy_regression | quadratic
batch_size = 64

[model]
name = "mlp"             # mlp | linear | cnn | residual_cnn | block_linear
widths = [64, 32]

[algorithm]
mode = "blockwise"       # "blockwise" (Algorithm 1) | "entire" (baseline)
schedule = "jacobi"      # "jacobi" | "gauss_seidel"
K = 10
lambda = 0.01
gamma = 1.0
accuracy_factor = -1
solver = "momentum"      # sgd | momentum | adam
lr = 0.05

[eval]
every = 5

# [[stop]]
# kind = "patience"
# metric = "val_loss"
# patience = 4

# [sweep]                # a grid: one run per combination
# "algorithm.K" = [1, 5, 10]
# "run.seed" = [0, 1]
"""

_TOML_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")


def list_recipes(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*.toml") if not any(part.startswith(".") for part in p.relative_to(root).parts))


def display_name(path: Path, root: Path | None) -> str:
    """A recipe's path as messages show it: relative to the recipes directory when under it."""
    path = Path(path)
    if root is not None:
        try:
            return str(path.resolve().relative_to(Path(root).resolve()))
        except ValueError:
            pass
    return str(path)


@dataclass
class Validation:
    ok: bool
    message: str  # one line: "ok: ..." or the validator's error
    line: int | None = None  # 1-based line of the error in the text, when known
    recipe: Recipe | None = None
    points: list[dict] = field(default_factory=list)  # sweep grid points (empty: no sweep)


def error_line(message: str, source: str) -> int | None:
    """The line number in a validator message `source:LINE: ...`."""
    m = re.match(re.escape(source) + r":(\d+):", message)
    return int(m.group(1)) if m else None


def summarize(recipe: Recipe) -> str:
    a = recipe.algorithm
    how = "entire" if a.mode == "entire" else f"blockwise/{a.schedule}"
    text = (f"{recipe.model.name} on {recipe.data.name}, {how}, {a.solver}, K={a.K}, "
            f"{recipe.run.rounds} rounds")
    if recipe.sweep:
        n = len(expand_grid(recipe.sweep))
        text += f"; sweep of {n} runs over {', '.join(recipe.sweep)}"
    return text


def validate_text(text: str, source: str = "<recipe>", overrides: list[str] | tuple[str, ...] = ()) -> Validation:
    """Validate editor text as `bcdcore check` does before it builds the model (the full check, which also
    counts the model's blocks for per-block lists, is `full_check`)."""
    try:
        raw = plain(tomllib.loads(text))  # plain: bounded nesting, so nothing after this can recurse too deep
    except (RecursionError, RecordError):
        return Validation(False, f"{source}: not a recipe: nested too deeply")
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _TOML_LINE.search(msg)
        line = int(m.group(1)) if m else None
        where = f"{source}:{line}" if line else source
        return Validation(False, f"{where}: not valid TOML: {_TOML_LINE.sub('', msg).strip()}", line)
    try:
        recipe = parse_recipe(raw, source=source, text=text, overrides=list(overrides))
    except RecipeError as exc:
        msg = str(exc)
        return Validation(False, msg, error_line(msg, source))
    points = expand_grid(recipe.sweep) if recipe.sweep else []
    return Validation(True, f"ok: {summarize(recipe)}", None, recipe, points)


def parse_overrides(text: str) -> list[str]:
    """`algorithm.K=5 algorithm.lambda=[0.1,0.2]` (space or newline separated; quote values with spaces)."""
    try:
        items = shlex.split(text.replace(",\n", "\n"), posix=True)
    except ValueError as exc:
        raise RecipeError(f"overrides: {exc}") from None
    for item in items:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected KEY=VALUE, e.g. algorithm.K=5")
    return items


def new_recipe(root: Path, name: str) -> Path:
    """Write the template as `root/name.toml` (refuses to overwrite)."""
    name = name.strip().removesuffix(".toml")
    if not re.fullmatch(r"[A-Za-z0-9_.\-/]+", name) or ".." in name.split("/"):
        raise RecipeError(f"recipe name {name!r}: use letters, digits and _ - . (and / for folders)")
    path = Path(root) / f"{name}.toml"
    if path.exists():
        raise RecipeError(f"{path} already exists; pick another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TEMPLATE.format(name=Path(name).name))
    return path


def save_recipe(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def editor_command(path: Path, environ: dict | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    editor = env.get("VISUAL") or env.get("EDITOR") or "vi"
    return [*shlex.split(editor), str(path)]


def full_check(path: Path, overrides: list[str] | tuple[str, ...] = (), engine: list[str] | None = None,
               timeout: float = 300) -> tuple[bool, str]:
    """`bcdcore check` in a subprocess (it builds the model and opens the data): (ok, its one line)."""
    args = [*(engine or [sys.executable, "-m", "bcdcore"]), "check", str(path)]
    for item in overrides:
        args += ["--set", item]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"bcdcore check did not answer within {timeout:.0f} s"
    except OSError as exc:
        return False, f"could not run bcdcore check: {exc}"
    lines = [l for l in (out.stdout + out.stderr).splitlines() if l.strip()]
    line = next((l for l in reversed(lines) if l.startswith(("ok:", "error:"))), lines[-1] if lines else "")
    return out.returncode == 0, line.removeprefix("error: ")


# ----------------------------------------------------------------------------------------------------------
# launch plans

@dataclass
class LaunchPlan:
    """What a launch will start: one recipe file and one override list per run (one run, or a grid)."""

    recipe: Path  # the file the engine runs
    runs: list[list[str]]  # override list per run
    label: str
    summary: str
    points: list[dict] = field(default_factory=list)  # the sweep's grid points (empty: one plain run)

    @property
    def sweep_point(self) -> bool:
        """Each run is one point of the recipe's [sweep] grid (started with --sweep-point)."""
        return bool(self.points)

    def describe(self, limit: int = 12) -> list[str]:
        if not self.points:
            return [" ".join(self.runs[0]) or "(no overrides)"]
        lines = [", ".join(f"{k}={toml_value(v)}" for k, v in p.items()) for p in self.points[:limit]]
        if len(self.points) > limit:
            lines.append(f"... and {len(self.points) - limit} more")
        return lines


def read_recipe_text(path: Path) -> str:
    """A recipe file's text, read by the engine's own reader (bcdcore.recipe.read_recipe_text: size, UTF-8,
    a directory or FIFO refused unread), so the workstation accepts exactly the files `bcdcore run` does; the
    error line is made printable for the terminal."""
    try:
        return core_read_recipe_text(Path(path))
    except RecipeError as exc:
        raise RecipeError(printable(str(exc))) from None


def data_root(root: str, environ: dict | None = None) -> Path:
    """Where a dataset's files live, as bcdcore.data reads them: [data] root, else $BCD_DATA, else
    ~/.cache/bcd/data (the same rule, without importing the data module and torch)."""
    env = (os.environ if environ is None else environ).get("BCD_DATA", "")
    return Path(root).expanduser() if root else Path(env).expanduser() if env else Path.home() / ".cache/bcd/data"


def missing_data(recipe: Recipe) -> str:
    """Why the recipe's dataset files are not there ("" when they are, or it needs none, or it may download
    them): the launch dialog refuses such a recipe instead of starting a run that fails at once."""
    spec = DATASETS.get(recipe.data.name)
    if spec is None or not spec.files or recipe.data.download:
        return ""
    root = data_root(recipe.data.root)
    first = spec.files.split("/", 1)[0]
    folders = first.strip("{}").split(",") if first.startswith("{") else [first]
    if any((root / f).exists() for f in folders):
        return ""
    return (f"data.name = {recipe.data.name!r} reads {spec.files} under {root}, and {root / folders[0]} is "
            "missing: put the files there, set data.root to their folder, or set data.download = true")


def plan_launch(path: Path, overrides: list[str] | tuple[str, ...] = (), source: str | None = None) -> LaunchPlan:
    """Validate `path` with `overrides` and expand its sweep. A recipe with a [sweep] table runs point by point,
    as `bcdcore sweep` runs it: each point is `bcdcore run RECIPE --sweep-point` with the point's values as
    `--set` overrides (bcdcore.scheduler.run_command). Raises RecipeError with the validator's line."""
    path = Path(path)
    check = validate_text(read_recipe_text(path), source or str(path), overrides)
    if not check.ok:
        raise RecipeError(check.message)
    recipe = check.recipe
    missing = missing_data(recipe)
    if missing:
        raise RecipeError(f"{source or path}: {missing}")
    base = list(overrides)
    summary = check.message.removeprefix("ok: ")
    found = find_plugins(recipe)  # a plugin the runs could not import is refused here, not in every run
    if found:
        summary += "; plugins: " + ", ".join(f"{name} ({where})" for name, where in found.items())
    if not check.points:
        return LaunchPlan(path, [base], recipe.run.name, summary)
    swept = set(recipe.sweep)
    fixed = [o for o in base if o.split("=", 1)[0].strip() not in swept]
    runs = [fixed + point_overrides(point) for point in check.points]
    return LaunchPlan(path, runs, recipe.run.name, summary, check.points)


# ----------------------------------------------------------------------------------------------------------
# plugins: found, never imported (the engine imports and checks them: `bcdcore check`)

def add_plugin_dirs(dirs: list[Path] | tuple[Path, ...]) -> None:
    """`bcdtui --plugins DIR`: DIR goes on PYTHONPATH, which every run the workstation starts inherits."""
    paths = [str(Path(d).expanduser().resolve()) for d in dirs]
    for path in paths:
        if not Path(path).is_dir():
            raise RecipeError(f"--plugins {path}: no such folder; give the folder that holds your package")
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*paths, *current]))


def find_plugins(recipe: Recipe, search: list[str] | None = None) -> dict[str, str]:
    """Top-level package of each plugin -> the folder it was found in, looked up on the path a launched run
    will have (PYTHONPATH, the working directory, this interpreter's sys.path). RecipeError when one is missing."""
    if search is None:
        search = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [os.getcwd(), *sys.path]
    found: dict[str, str] = {}
    for key, name in plugin_names(recipe):
        if name.startswith("live:"):
            raise RecipeError(f"{key} = {name!r} is an object of a Python session; name an importable "
                              f"'package.module:name' to launch it from here")
        top = re.split(r"[.:]", name, maxsplit=1)[0]
        if top in found or top in sys.builtin_module_names:
            continue
        spec = importlib.machinery.PathFinder.find_spec(top, [p or os.getcwd() for p in search])
        if spec is None:
            raise RecipeError(f"{key} = {name!r}: package {top!r} not found on PYTHONPATH; start bcdtui with "
                              f"--plugins DIR (the folder that holds {top}/) or add it to PYTHONPATH")
        locations = list(spec.submodule_search_locations or [])
        origin = Path(locations[0]) if locations else Path(spec.origin or ".")
        found[top] = display_folder(origin.parent)  # the folder that holds the package (or module file)
    return found


def display_folder(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)
