"""Recipe differences between runs: each run's resolved recipe.toml flattened to dotted keys
(`algorithm.K`, `stop[0].kind`), one row per key, and a "differences only" view."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcdcore.recipe import flatten
from bcdcore.rundir import printable, read_recipe_dict

MISSING = object()


def load_recipe_dict(run_dir: Path) -> dict:
    """A run's resolved recipe as a dict ({} when it is missing or unreadable: any bytes, see
    bcdcore.rundir.read_recipe_dict; its nesting is bounded, so `flatten` cannot recurse too deep)."""
    return read_recipe_dict(Path(run_dir))[0]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def show_value(value: Any) -> str:
    if value is MISSING:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{printable(value)}"'
    if isinstance(value, list):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return printable(str(value))


@dataclass
class DiffRow:
    key: str
    values: list[Any]  # one per recipe; MISSING where a recipe lacks the key
    differs: bool

    def cells(self) -> list[str]:
        return [self.key, *(show_value(v) for v in self.values)]


def recipe_diff(recipes: list[dict], only_differences: bool = False) -> list[DiffRow]:
    """Rows over the union of keys (in first-seen order, which keeps each recipe's section order)."""
    flats = [flatten(r) for r in recipes]
    keys: list[str] = []
    seen: set[str] = set()
    for flat in flats:
        for key in flat:
            if key not in seen:
                seen.add(key)
                keys.append(key)
    rows = []
    for key in keys:
        values = [flat.get(key, MISSING) for flat in flats]
        differs = any(v is MISSING for v in values) or not all(_same(values[0], v) for v in values[1:])
        if only_differences and not differs:
            continue
        rows.append(DiffRow(key, values, differs))
    return rows


def diff_runs(run_dirs: list[Path], only_differences: bool = False) -> list[DiffRow]:
    return recipe_diff([load_recipe_dict(p) for p in run_dirs], only_differences)


def _short(key: str) -> str:
    """`algorithm.lambda` -> `lambda`, `stop[0].kind` -> `kind`."""
    return key.rsplit(".", 1)[-1].split("[", 1)[0]


def legend_names(rows: list[DiffRow], fallback: list[str], max_keys: int = 3) -> list[str]:
    """A legend label per run from the recipe keys that differ (`lambda=0.05 K=5`), not the run ids: run.name
    never (it is in the id), run.* keys (seed, ...) after the others, `[[stop]]` / `[[measure]]` entries only
    when nothing else differs; a short key name unless two chosen keys share it. At most `max_keys` keys;
    where that leaves two runs with one label (or nothing differs) the run's `fallback` name is added."""
    n = len(fallback)
    differing = [r for r in rows if r.differs and r.key != "run.name" and len(r.values) == n]
    plain = [r for r in differing if not r.key.startswith(("stop[", "measure["))] or differing
    chosen = ([r for r in plain if not r.key.startswith("run.")] + [r for r in plain if r.key.startswith("run.")])
    chosen = chosen[:max_keys]
    shorts = [_short(r.key) for r in chosen]
    names = [s if shorts.count(s) == 1 else r.key for s, r in zip(shorts, chosen)]
    labels = [" ".join(f"{name}={show_value(r.values[i])}" for name, r in zip(names, chosen)) for i in range(n)]
    return [fallback[i] if not label else f"{label} ({fallback[i]})" if labels.count(label) > 1 else label
            for i, label in enumerate(labels)]
