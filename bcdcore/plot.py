"""Curves from run directories: one line per run, or a mean +/- std band for runs that differ only by seed.

Colours follow the paper convention: black, red, blue, brown, purple, green, then matplotlib's defaults.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bcdcore.recipe import flatten
from bcdcore.rundir import metric_table, printable, read_events, read_recipe_dict

PAPER_COLOURS = ["black", "red", "blue", "brown", "purple", "green"]
X_AXES = ("grad_evals", "flops", "samples", "wall_s", "round", "bytes_comm", "sim_time_s")


class PlotError(ValueError):
    """A plot request that cannot be drawn, phrased as one line for the user."""


def colours(n: int) -> list:
    import matplotlib

    defaults = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", [])
    palette = PAPER_COLOURS + [c for c in defaults]
    return [palette[i % len(palette)] for i in range(n)]


def _recipe_without_seed(run: Path) -> dict:
    recipe, problem = read_recipe_dict(run)
    if problem:
        raise PlotError(f"{printable(str(run))}: cannot read its recipe ({problem}); is it a run directory?")
    if isinstance(recipe.get("run"), dict):
        recipe["run"].pop("seed", None)
    return recipe


def group_by_seed(runs: list[Path]) -> list[list[Path]]:
    """Runs whose resolved recipes are equal but for run.seed form one group (kept in first-seen order)."""
    groups: dict[str, list[Path]] = {}
    for run in runs:
        key = repr(sorted(flatten(_recipe_without_seed(run)).items()))
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def _labels(groups: list[list[Path]]) -> list[str]:
    """Label each group by the recipe keys that differ between groups (else by run name)."""
    flats = [{k: repr(v) for k, v in flatten(_recipe_without_seed(g[0])).items()} for g in groups]
    differing = {k for f in flats for k in f if any(f.get(k) != g.get(k) for g in flats)} - {"run.name"}
    # stoppers and measurements are lists of tables: they make unreadable labels and rarely name the curve
    keys = sorted(k for k in differing if k.split(".")[0] not in ("stop", "measure")) or sorted(differing)
    labels = []
    for group, flat in zip(groups, flats):
        text = ", ".join(f"{k.split('.')[-1]}={flat.get(k, '-')}" for k in keys) or group[0].name
        if not keys and len(groups) > 1:
            text = group[0].name
        text = text if len(text) <= 60 else text[:57] + "..."
        text = printable(text).replace("$", r"\$")  # a "$" from a name or value must not start mathtext
        labels.append(text + (f" (n={len(group)})" if len(group) > 1 else ""))
    return labels


def series(run: Path, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """The finite (x, y) points of one run; bad event lines are skipped (and named when nothing is left)."""
    events = read_events(run)
    table = metric_table(events)
    name = printable(str(run))
    skipped = f"; {events.note}" if events.note else ""
    if y not in table:
        known = ", ".join(k for k in table if k not in X_AXES) or "none"
        raise PlotError(f"{name}: no metric {y!r} in its events (it has: {known}){skipped}")
    if x not in table:
        raise PlotError(f"{name}: no {x!r} in its events (sim_time_s and bytes_comm come from distributed runs)"
                        f"{skipped}")
    xs, ys = np.asarray(table[x]), np.asarray(table[y])
    keep = np.isfinite(ys) & np.isfinite(xs)
    return xs[keep], ys[keep]


def ema(ys: np.ndarray, factor: float) -> np.ndarray:
    """Exponential moving average s_i = factor * s_(i-1) + (1 - factor) * y_i from the first value (the same
    formula as bcdtui's compare screen, so its `p` key writes the curve it shows)."""
    out = np.array(ys, dtype=float)
    for i in range(1, len(out)):
        out[i] = factor * out[i - 1] + (1.0 - factor) * out[i]
    return out


def plot_runs(runs: list[Path], x: str = "grad_evals", y: str = "train_loss", out: Path | None = None,
              logy: bool = False, logx: bool = False, title: str | None = None, smooth: float = 0.0):
    """Draw the runs and return the matplotlib Figure (saved to `out` as PNG or PDF by its suffix). `smooth`
    in [0, 1) draws each curve's EMA over its raw curve (drawn faint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in X_AXES:
        raise PlotError(f"--x {x!r}: choose one of {', '.join(X_AXES)}")
    if out is not None and Path(out).suffix.lower() not in (".png", ".pdf"):
        raise PlotError(f"--out {out}: use a .png or .pdf file name")
    if not 0.0 <= smooth < 1.0:
        raise PlotError(f"--smooth {smooth}: use a factor from 0 (raw) up to, not including, 1")
    runs = [Path(r) for r in runs]
    for r in runs:
        if not (r / "metrics.jsonl").is_file():
            raise PlotError(f"{printable(str(r))}: not a run directory (no metrics.jsonl)")
    groups = group_by_seed(runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, colour, label in zip(groups, colours(len(groups)), _labels(groups)):
        curves = [series(r, x, y) for r in group]
        drawn = [c for c in curves if len(c[0])]  # a run without finite points adds nothing to a band
        if len(drawn) <= 1:
            cx, cy = (drawn or curves)[0]
            if smooth:
                ax.plot(cx, cy, color=colour, linewidth=1.0, alpha=0.25)
                cy = ema(cy, smooth)
            ax.plot(cx, cy, color=colour, label=label, linewidth=1.5)
            continue
        curves = [(cx[order], cy[order]) for cx, cy in drawn for order in [np.argsort(cx, kind="stable")]]
        # mean +/- std over seeds on a common x grid (the shortest run bounds it)
        end = min(c[0][-1] for c in curves)
        grid = np.unique(np.concatenate([c[0][c[0] <= end] for c in curves]))
        stack = np.stack([np.interp(grid, cx, cy) for cx, cy in curves])
        mean, std = stack.mean(0), stack.std(0)
        if smooth:
            mean, std = ema(mean, smooth), ema(std, smooth)
        ax.plot(grid, mean, color=colour, label=label, linewidth=1.5)
        ax.fill_between(grid, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel(x)
    ax.set_ylabel(y + (f" (EMA {smooth:g})" if smooth else ""))
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=150)
    return fig
