"""Compare marked runs: their curves overlaid (one chart, or a grid of metrics), EMA smoothing over the raw
curves, a summary table (final and best values, test metrics, gradient evaluations, wall time) beside the recipe
keys that differ, legends named by those keys, and `p` to write the chart as a PNG through `bcdcore plot`."""
from __future__ import annotations

import math
from functools import partial

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.widgets import DataTable, Static

from bcdcore.rundir import display_id
from bcdtui.charts import PALETTE, line_chart
from bcdtui.compare import (
    chart_series,
    grid_metrics,
    next_smoothing,
    plot_command,
    plot_path,
    run_plot,
    summary_metrics,
    summary_rows,
)
from bcdtui.diff import diff_runs, legend_names
from bcdtui.screens.base import CHART_BINDINGS, FOLLOW_S, ChartAxes, WsScreen
from bcdtui.widgets import KeyBar, LineChart, TopBar
from bcdtui.workstation import Comparison

GRID_CHARTS = 4
WIDE = 120  # columns from which the tables' headers carry the short run ids
BEST_STYLE = "bold #81c784"
DIFF_STYLE = "bold #ffb74d"


class GridChart(LineChart):
    """A chart of the grid: only the first one carries the legend (it is the same for all), so the others keep
    their rows for the curves."""

    def __init__(self, legend: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.legend = legend

    def build(self, width: int, height: int) -> list[Text]:
        return line_chart(self.series, width, height, log_y=self.log_y, x_label=self.x_label,
                          legend=self.legend and len(self.series) > 1)


class CompareScreen(ChartAxes, WsScreen):
    BINDINGS = [
        *CHART_BINDINGS,
        Binding("s", "smooth(1)", "Smooth", tooltip="EMA smoothing: the next factor (0.5, 0.8, 0.9, 0.95, 0.99, "
                                                    "then off); the raw curves stay, faded, and the factor is shown"),
        Binding("S", "smooth(-1)", "Less smooth", show=False, tooltip="EMA smoothing: the previous factor"),
        Binding("v", "grid", "Grid", tooltip="one chart, or a grid of up to four metrics (y picks the first)"),
        Binding("p", "plot", "PNG", tooltip="write the chart as a PNG through bcdcore plot (same metric, x axis, "
                                            "log y and smoothing) in the first run's figures/"),
        Binding("d", "toggle_diff", "All keys/diff", tooltip="recipe table: differences only, or every key"),
    ]

    def __init__(self, comparison: Comparison) -> None:
        super().__init__()
        self.comparison = comparison
        self.only_differences = True
        self.smooth = 0.0
        self.grid = False
        self.message = ""
        self.plots = 0
        paths = [f.path for f in comparison.followers]
        self.recipe_rows = diff_runs(paths)  # every key, once: the table filters it, the legend reads it
        # the short ids (with the display name a user gave a run, bcdcore.annotations) name the runs' columns and,
        # where the recipes cannot tell runs apart, their curves
        from bcdcore.annotations import read_annotations  # here: the app's start imports no more of bcdcore

        self.short_ids = [display_id(r, read_annotations(f.path)[0].name)
                          for r, f in zip(comparison.run_ids, comparison.followers)]
        self.labels = legend_names(self.recipe_rows, self.short_ids)

    def compose(self) -> ComposeResult:
        yield TopBar(f"Compare {len(self.comparison.run_ids)} runs", id="topbar")
        with Grid(id="cmp-charts"):
            yield GridChart(True, id="cmp-chart")
            for i in range(1, GRID_CHARTS):
                yield GridChart(False, id=f"cmp-chart-{i}", classes="grid-only")
        with Horizontal(id="cmp-lower"):
            yield DataTable(id="summary", cursor_type="row", zebra_stripes=True)
            yield DataTable(id="diff", cursor_type="row", zebra_stripes=True)
        yield Static(id="cmp-status")
        yield KeyBar()

    def on_mount(self) -> None:
        names = self.comparison.metric_names()
        if self.metric not in names:
            self.metric = names[0]
        self._draw_chart()
        self._draw_summary()
        self._draw_diff()
        self.query_one("#summary", DataTable).focus()
        self.set_interval(FOLLOW_S * 2, self.poll)

    def poll(self) -> None:
        if self.is_current and any([f.poll().metrics for f in self.comparison.followers]):
            self._draw_chart()
            self._draw_summary()

    # --- drawing
    def chart_metrics(self) -> list[str]:
        return self.comparison.metric_names()

    def shown_metrics(self) -> list[str]:
        """The metric of each visible chart: one, or the grid's."""
        return grid_metrics(self.chart_metrics(), self.metric, GRID_CHARTS) if self.grid else [self.metric]

    def _draw_chart(self) -> None:
        metrics = self.shown_metrics()
        self.query_one("#cmp-charts").set_class(self.grid, "-grid")
        self.query_one("#cmp-lower").set_class(self.grid, "-grid")
        smoothing = f" · EMA {self.smooth:g}" if self.smooth else ""
        for i, chart in enumerate(self.query(GridChart)):
            chart.set_class(i < len(metrics), "-used")
            if i >= len(metrics):
                continue
            curves = [f.series(metrics[i], self.x_axis) for f in self.comparison.followers]
            chart.set_data(chart_series(curves, self.labels, self.smooth), log_y=self.log_y, x_label=self.x_axis)
            chart.border_title = f"{metrics[i]} vs {self.x_axis}{' (log y)' if self.log_y else ''}{smoothing}"
        self._draw_status()

    def _draw_status(self) -> None:
        line = Text()
        if self.smooth:
            line.append(f"smoothing: EMA {self.smooth:g}", style="bold")
            line.append(" (raw curves faded underneath; s/S change it)", style="dim")
        else:
            line.append("smoothing off (s)", style="dim")
        if self.message:
            line.append("  ·  ")
            line.append(self.message, style="bold #e57373" if self.message.startswith("error") else "")
        self.query_one("#cmp-status", Static).update(line)

    def _headers(self, table: DataTable, first: str) -> None:
        table.clear(columns=True)
        table.add_column(first, key="key")
        wide = self.app.size.width >= WIDE
        for i, short in enumerate(self.short_ids):
            # the run's curve colour; its short id too where there is room (at 80 columns two runs must fit)
            table.add_column(Text(f"━ {i + 1}" + (f": {short}" if wide else ""), style=PALETTE[i % len(PALETTE)]),
                             key=f"run{i}")

    def _draw_summary(self) -> None:
        followers = self.comparison.followers
        walls = [_elapsed(f.status) for f in followers]
        rows = summary_rows([f.columns for f in followers], summary_metrics(self.chart_metrics()), walls)
        table = self.query_one("#summary", DataTable)
        row_at = table.cursor_row
        self._headers(table, "summary")
        for row in rows:
            cells = row.cells()
            table.add_row(Text(cells[0]), *(Text(c, style=BEST_STYLE if row.best == i else "")
                                            for i, c in enumerate(cells[1:])))
        table.border_title = "summary (best in green)"
        if row_at < table.row_count:
            table.move_cursor(row=row_at)

    def _draw_diff(self) -> None:
        rows = [r for r in self.recipe_rows if r.differs or not self.only_differences]
        self.comparison.diff = rows
        table = self.query_one("#diff", DataTable)
        self._headers(table, "recipe key")
        for row in rows:
            style = DIFF_STYLE if row.differs else ""
            table.add_row(*(Text(c, style=style) for c in row.cells()))
        n = sum(r.differs for r in self.recipe_rows)
        table.border_title = f"recipe: {n} keys differ" if self.only_differences else f"recipe: all ({n} differ)"
        if not rows:
            table.add_row(Text("(the recipes are identical)", style="dim"), *([""] * len(self.short_ids)))

    # --- keys
    def action_toggle_diff(self) -> None:
        self.only_differences = not self.only_differences
        self._draw_diff()

    def action_smooth(self, step: int) -> None:
        self.smooth = next_smoothing(self.smooth, step)
        self._draw_chart()

    def action_grid(self) -> None:
        self.grid = not self.grid
        self._draw_chart()

    def action_plot(self) -> None:
        """The chart as a PNG: `bcdcore plot` in a thread (matplotlib takes seconds; the UI stays live)."""
        paths = [f.path for f in self.comparison.followers]
        out = plot_path(paths[0], self.metric, self.x_axis, self.smooth)
        cmd = plot_command(paths, self.metric, self.x_axis, out, log_y=self.log_y, smooth=self.smooth)
        self.message = f"writing {out} …"
        self._draw_status()
        self.plots += 1  # a second p while one runs: only the latest one's outcome is shown
        self.run_worker(partial(self._plot, cmd, self.plots), thread=True, group="plot")

    def _plot(self, cmd: list[str], number: int) -> None:
        ok, line = run_plot(cmd)
        try:
            self.app.call_from_thread(self._plotted, ok, line, number)
        except RuntimeError:  # the app closed while the plot ran (the PNG is still written)
            pass

    def _plotted(self, ok: bool, line: str, number: int) -> None:
        if number != self.plots:
            return
        self.message = line if ok else f"error: {line.removeprefix('error: ')}"
        if self.is_attached:
            self._draw_status()


def _elapsed(status: dict) -> float:
    """ended - started from status.json (the wall time of a run whose events carry no wall_s)."""
    try:
        value = float(status.get("ended")) - float(status.get("started"))
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) and value >= 0 else math.nan
