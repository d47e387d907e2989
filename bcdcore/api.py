"""The Python API, for notebooks and scripts: `train` runs one recipe and `load_run` reads a run back.

    import bcdcore
    run = bcdcore.train("examples/custom/custom.toml", runs_dir="runs")
    run.history["val_loss"], run.final["test_acc"], run.path

`train` writes the same run directory as `bcdcore run` (the TUI, `bcdcore ls` and `bcdcore plot` see it). Its
recipe is a path, TOML text, a dict or a Recipe; `model` and `data` put Python objects in place of the names:
an nn.Module (trained in place), or a builder `build(input_shape, n_outputs, **args)`; a DataBundle, or a
loader `load(**args)`. An importable function or class is recorded by its dotted path (the run can be resumed
and exported anywhere); any other object under a `live:` name that only this process can resolve.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np

from bcdcore.recipe import Recipe, RecipeError, load_recipe, parse_recipe, parse_toml, read_recipe_text

RecipeLike = Union[str, Path, Mapping[str, Any], Recipe]


@dataclass
class RunResult:
    """A run directory as numbers: state, metric history (one numpy array per metric, one entry per recorded
    round, nan where a round lacks it) and the final metrics (the last recorded round's)."""

    path: Path
    state: str
    reason: str
    history: dict[str, np.ndarray] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    recipe: Recipe | None = None  # None when the run's recipe.toml cannot be read back
    exit_code: int | None = None  # of the train() call that made it; None for load_run

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.final.items() if k.startswith(("test", "val")))
        return f"RunResult({str(self.path)!r}, {self.state}: {self.reason}; {shown})"


def train(recipe: RecipeLike, model: Any = None, data: Any = None, *, runs_dir: str | Path | None = None,
          overrides: list[str] | tuple[str, ...] = (), progress: bool = False) -> RunResult:
    """Run one recipe to its end in this process and return the run read back (`load_run`).

    Recipe problems raise bcdcore.recipe.RecipeError (one line) before anything is written; a run that fails
    returns with `state == "failed"` and the reason, as `bcdcore run` records it."""
    from bcdcore.run import final_summary, launch_distributed, start_run
    from bcdcore.rundir import default_runs_dir

    parsed = build_recipe(recipe, model, data, overrides)
    if parsed.sweep:
        raise RecipeError(f"{parsed.source}: has a [sweep] table; train runs one recipe: call train once per "
                          f"point (overrides=[...]) or use `bcdcore sweep`")
    runs_dir = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    if parsed.distributed.nproc > 1:
        if any(name.startswith("live:") for name in (parsed.model.name, parsed.data.name)):
            raise RecipeError("distributed.nproc > 1 starts new processes, which cannot see objects passed to "
                              "train; pass an importable builder or loader ('package.module:name') instead")
        lines: list[str] = []
        code = launch_distributed(parsed, runs_dir, None, not progress, lines.append)
        made = [line.removeprefix("run directory: ") for line in lines if line.startswith("run directory: ")]
        if not made:
            raise RecipeError(lines[-1] if lines else "the distributed run wrote no run directory")
        result = load_run(Path(made[0]))
        result.exit_code = code
        return result
    console = None
    if progress:
        from rich.console import Console

        console = Console(stderr=True)
    run = start_run(parsed, runs_dir)
    code = run.execute(console)
    if progress:
        print(final_summary(run.state, run.reason, getattr(run, "final_metrics", None)))
    result = load_run(run.rundir.path)
    result.exit_code = code
    return result


def build_recipe(recipe: RecipeLike, model: Any = None, data: Any = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A validated Recipe from a path, TOML text, a dict or a Recipe, with `model`/`data` objects in place of
    the names."""
    if isinstance(recipe, Recipe):
        raw, source, text = recipe.to_dict(), recipe.source or "<recipe>", ""
    elif isinstance(recipe, Mapping):
        raw, source, text = copy.deepcopy(dict(recipe)), "<recipe>", ""
    elif isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe and "=" not in recipe):
        source = str(recipe)
        text = read_recipe_text(Path(recipe))
        raw = parse_toml(text, source)
    elif isinstance(recipe, str):
        raw, source, text = parse_toml(recipe, "<recipe text>"), "<recipe text>", recipe
    else:
        raise RecipeError(f"recipe: expected a path, TOML text, a dict or a Recipe, got {type(recipe).__name__}")
    if model is not None:
        raw.setdefault("model", {})["name"] = object_name(model, "model")
    if data is not None:
        raw.setdefault("data", {})["name"] = object_name(data, "data")
    return parse_recipe(raw, source=source, text=text, overrides=overrides)


def object_name(obj: Any, kind: str) -> str:
    """The recipe name of a Python object: its dotted path when importable from there, else a live name."""
    from bcdcore import plugins

    if isinstance(obj, str):
        return obj
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if callable(obj) and module and qualname and module != "__main__" and "<" not in qualname:
        path = f"{module}:{qualname}"
        try:
            if plugins.import_object(path, f"{kind}.name") is obj:
                return path
        except RecipeError:
            pass
    return plugins.live_name(obj, kind)


def load_run(path: str | Path) -> RunResult:
    """A run directory read back: never raises on its contents (unreadable files give an empty history and
    the state `unreadable`); a path that is no folder raises RecipeError."""
    from bcdcore.rundir import metric_table, read_events, read_status_checked, run_state

    path = Path(path)
    if not path.is_dir():
        raise RecipeError(f"{path}: not a run directory")
    status, problem = read_status_checked(path)
    shown = run_state(status, path, problem)
    events = read_events(path)
    ends = [e for e in events if e.get("kind") == "end"]
    reason = str(status.get("reason") or (ends[-1].get("reason") if ends else "") or problem or "")
    history = {name: np.asarray(values, dtype=np.float64) for name, values in metric_table(list(events)).items()}
    metrics = [e for e in events if e.get("kind") == "metric"]
    final = {k: float(v) for k, v in (metrics[-1] if metrics else {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("v", "t")}
    try:
        recipe = load_recipe(path / "recipe.toml")
    except (RecipeError, OSError):
        recipe = None
    return RunResult(path=path, state=shown.state, reason=reason, history=history, final=final, recipe=recipe)

