"""The compare screen's logic, without a terminal: EMA smoothing of a curve, the summary table (final and best
of each metric, test metrics, gradient evaluations and wall time per run), the metrics a grid of charts shows,
and the `bcdcore plot` command line that writes the current chart as a PNG."""
from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from bcdcore.rundir import printable
from bcdtui.charts import PALETTE, Series, faded

# the factors the smoothing key steps through (0 = the raw curve); TensorBoard's slider spans the same range
SMOOTHING = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)
X_COLUMNS = ("round", "grad_evals", "flops", "samples", "bytes_comm", "wall_s")
GRID_MAX = 4  # charts in the grid (2 x 2): more are unreadable at 80x24
PLOT_TIMEOUT_S = 120.0


def ema(values: Sequence[float], factor: float) -> list[float]:
    """Exponential moving average s_i = factor * s_(i-1) + (1 - factor) * y_i, started at the first finite
    value. Non-finite values pass through and do not enter the average (one nan must not blank the curve).
    factor 0 returns the values unchanged. bcdcore.plot's `--smooth` uses the same formula."""
    if not 0.0 <= factor < 1.0:
        raise ValueError(f"smoothing factor {factor}: use 0 <= factor < 1")
    out: list[float] = []
    state: float | None = None
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        state = value if state is None else factor * state + (1.0 - factor) * value
        out.append(state)
    return out


def next_smoothing(factor: float, step: int = 1) -> float:
    """The next (step 1) or previous (step -1) factor of SMOOTHING, wrapping around."""
    index = min(range(len(SMOOTHING)), key=lambda i: abs(SMOOTHING[i] - factor))
    return SMOOTHING[(index + step) % len(SMOOTHING)]


def higher_is_better(metric: str) -> bool:
    """Accuracy-like metrics are maximised; losses and everything else are minimised."""
    return metric.lower().rsplit("_", 1)[-1] in ("acc", "accuracy", "auc", "f1", "r2", "precision", "recall")


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def number(value: float) -> str:
    if not math.isfinite(value):
        return "—"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


@dataclass
class SummaryRow:
    label: str
    values: list[float]  # one per run; nan where a run has no value
    best: int | None = None  # the run with the best value (None: no direction, or fewer than two values)
    kind: str = "metric"  # metric | count | seconds: how cells are written

    def cells(self) -> list[str]:
        show = duration if self.kind == "seconds" else number
        return [self.label, *(show(v) for v in self.values)]


def _best(values: list[float], maximise: bool) -> int | None:
    present = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
    if len(present) < 2 or len({v for v, _ in present}) == 1:
        return None
    return (max(present) if maximise else min(present, key=lambda p: (p[0], -p[1])))[1]


def summary_rows(columns: list[dict[str, list[float]]], metrics: list[str],
                 wall_fallback: list[float] | None = None) -> list[SummaryRow]:
    """The summary table over runs' metric columns (one dict per run, as RunFollower.columns): for each of
    `metrics` (in that order) its final value and, for training and validation metrics, its best (min, or max
    for accuracy-like names), marking the best run; test metrics once (they are written at the end); then
    gradient evaluations and wall time (the last wall_s, else `wall_fallback[i]`, e.g. ended - started)."""
    rows: list[SummaryRow] = []
    n = len(columns)
    for metric in metrics:
        series = [_finite(c.get(metric, [])) for c in columns]
        finals = [s[-1] if s else math.nan for s in series]
        maximise = higher_is_better(metric)
        if metric.startswith("test_"):
            rows.append(SummaryRow(metric, finals, _best(finals, maximise)))
            continue
        rows.append(SummaryRow(f"{metric} final", finals, _best(finals, maximise)))
        bests = [(max(s) if maximise else min(s)) if s else math.nan for s in series]
        rows.append(SummaryRow(f"{metric} best", bests, _best(bests, maximise)))
    evals = [(_finite(c.get("grad_evals", [])) or [math.nan])[-1] for c in columns]
    rows.append(SummaryRow("grad_evals", evals, kind="count"))
    walls = [(_finite(c.get("wall_s", [])) or [math.nan])[-1] for c in columns]
    fallback = list(wall_fallback or []) + [math.nan] * n
    walls = [w if math.isfinite(w) else fallback[i] for i, w in enumerate(walls)]
    rows.append(SummaryRow("wall time", walls, kind="seconds"))
    return rows


def summary_metrics(names: list[str]) -> list[str]:
    """The metrics of the summary: training and validation ones first (in chart order), test ones last."""
    names = [m for m in names if m not in X_COLUMNS]
    return [m for m in names if not m.startswith("test_")] + [m for m in names if m.startswith("test_")]


def grid_metrics(names: list[str], first: str, count: int = GRID_MAX) -> list[str]:
    """The metrics of the chart grid: `first` (the chart's metric), then the ones after it in `names`,
    wrapping around; test metrics are left out (one point each) unless nothing else is there."""
    pool = [m for m in names if not m.startswith("test_")] or list(names)
    if first not in pool:
        return pool[:count]
    start = pool.index(first)
    return (pool[start:] + pool[:start])[:count]


# ----------------------------------------------------------------------------------------------------------
# `p`: the chart as a PNG through the CLI (a subprocess over an argument list: no shell, no matplotlib here)

def plot_path(first_run: Path, metric: str, x_axis: str, smooth: float) -> Path:
    """Where `p` writes: the first run's figures/ folder, as `bcdcore plot` does by default, with a name that
    says it is a comparison and its smoothing."""
    safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in f"{metric}_vs_{x_axis}")
    suffix = f"_ema{smooth:g}" if smooth else ""
    return Path(first_run) / "figures" / f"compare_{safe}{suffix}.png"


def plot_command(runs: list[Path], metric: str, x_axis: str, out: Path, *, log_y: bool = False,
                 smooth: float = 0.0, python: str = sys.executable) -> list[str]:
    """`python -m bcdcore.cli plot RUN... --x X --y METRIC --out OUT [--logy] [--smooth F]` as a list."""
    cmd = [python, "-m", "bcdcore.cli", "plot", *(str(r) for r in runs), "--x", x_axis, "--y", metric,
           "--out", str(out)]
    if log_y:
        cmd.append("--logy")
    if smooth:
        cmd += ["--smooth", f"{smooth:g}"]
    return cmd


Runner = Callable[..., subprocess.CompletedProcess]


def run_plot(cmd: list[str], run: Runner = subprocess.run, timeout: float = PLOT_TIMEOUT_S) -> tuple[bool, str]:
    """Run a plot command; (True, "wrote PATH") or (False, the one line that says why). Never raises."""
    try:
        done = run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"bcdcore plot did not finish in {timeout:.0f} s"
    except OSError as exc:
        return False, f"cannot start bcdcore plot: {exc.strerror or exc}"
    lines = [ln.strip() for ln in f"{done.stdout or ''}\n{done.stderr or ''}".splitlines() if ln.strip()]
    if done.returncode == 0:
        wrote = [ln for ln in lines if ln.startswith("wrote ")]
        return True, printable(wrote[-1] if wrote else f"wrote {cmd[cmd.index('--out') + 1]}")
    errors = [ln for ln in lines if "error" in ln.lower()] or lines
    return False, printable(errors[-1] if errors else f"bcdcore plot exited with {done.returncode}")


# ----------------------------------------------------------------------------------------------------------
# the chart's series: each run's raw curve, faded, under its EMA when smoothing is on

def chart_series(curves: list[tuple[list[float], list[float]]], labels: list[str], smooth: float) -> list[Series]:
    """One Series per run (`curves[i]` = its (xs, ys), `labels[i]` its legend name, colours in run order).
    With smoothing, the raw curves come first, faded and unlabelled, then the smoothed ones over them: the
    raw data stays on screen and the legend names each run once."""
    raw = [Series(label, list(xs), list(ys), PALETTE[i % len(PALETTE)])
           for i, ((xs, ys), label) in enumerate(zip(curves, labels))]
    if not smooth:
        return raw
    under = [Series("", s.xs, s.ys, faded(s.color)) for s in raw]
    return under + [Series(s.label, s.xs, ema(s.ys, smooth), s.color) for s in raw]
