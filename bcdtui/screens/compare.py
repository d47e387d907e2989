"""Compare marked runs: their curves overlaid, and the recipe keys that differ."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable

from bcdtui.diff import diff_runs
from bcdtui.runs import printable
from bcdtui.screens.base import CHART_BINDINGS, FOLLOW_S, ChartAxes, WsScreen
from bcdtui.widgets import KeyBar, LineChart, TopBar
from bcdtui.workstation import Comparison


class CompareScreen(ChartAxes, WsScreen):
    BINDINGS = [
        *CHART_BINDINGS,
        Binding("d", "toggle_diff", "All keys/diff", tooltip="recipe table: differences only, or every key"),
    ]

    def __init__(self, comparison: Comparison) -> None:
        super().__init__()
        self.comparison = comparison
        self.only_differences = True

    def compose(self) -> ComposeResult:
        yield TopBar(f"Compare {len(self.comparison.run_ids)} runs", id="topbar")
        yield LineChart(id="cmp-chart")
        yield DataTable(id="diff", cursor_type="row", zebra_stripes=True)
        yield KeyBar()

    def on_mount(self) -> None:
        names = self.comparison.metric_names()
        if self.metric not in names:
            self.metric = names[0]
        self._draw_chart()
        self._draw_diff()
        self.query_one("#diff", DataTable).focus()
        self.set_interval(FOLLOW_S * 2, self.poll)

    def poll(self) -> None:
        if self.is_current and any([f.poll().metrics for f in self.comparison.followers]):
            self._draw_chart()

    def _draw_chart(self) -> None:
        chart = self.query_one("#cmp-chart", LineChart)
        chart.set_data(self.comparison.series(self.metric, self.x_axis), log_y=self.log_y, x_label=self.x_axis)
        chart.border_title = self.chart_title()

    def _draw_diff(self) -> None:
        paths = [f.path for f in self.comparison.followers]
        self.comparison.diff = diff_runs(paths, self.only_differences)
        table = self.query_one("#diff", DataTable)
        table.clear(columns=True)
        table.add_column("recipe key", key="key")
        for i, run_id in enumerate(self.comparison.run_ids):
            table.add_column(Text(f"{i + 1}: {printable(run_id)}"), key=f"run{i}")
        for row in self.comparison.diff:
            cells = row.cells()
            style = "bold #ffb74d" if row.differs else ""
            table.add_row(*(Text(c, style=style) for c in cells))
        what = "differences only" if self.only_differences else "all keys"
        n = sum(r.differs for r in self.comparison.diff)
        table.border_title = f"recipe: {what} ({n} differ)"
        if not self.comparison.diff:
            table.add_row(Text("(the recipes are identical)", style="dim"), *([""] * len(self.comparison.run_ids)))

    def chart_metrics(self) -> list[str]:
        return self.comparison.metric_names()

    def action_toggle_diff(self) -> None:
        self.only_differences = not self.only_differences
        self._draw_diff()

