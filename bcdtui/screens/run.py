"""One run: its live chart, the blocks of the latest round, the log tail or a measurement's heat map."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import ContentSwitcher, DataTable, Log

from bcdtui.charts import Series, as_matrix
from bcdtui.runs import fmt_number, printable
from bcdtui.screens.base import CHART_BINDINGS, FOLLOW_S, ChartAxes, WsScreen
from bcdtui.screens.log import LogScreen
from bcdtui.views import block_cells, launch_summary, run_summary, short
from bcdtui.widgets import HeatMap, KeyBar, LineChart, StatusLines, TopBar


class RunScreen(ChartAxes, WsScreen):
    BINDINGS = [
        *CHART_BINDINGS,
        Binding("m", "panel", "Log/measures",
                tooltip="switch the side panel: log tail, then each measurement's heat map"),
        Binding("k", "kill", "Kill",
                tooltip="SIGTERM to the run's process group (it checkpoints, ends killed), SIGKILL after the "
                        "grace period; cancels a queued launch"),
        Binding("r", "rerun", "Rerun", tooltip="run the same resolved recipe again as a new run"),
        Binding("u", "resume", "Resume", tooltip="continue a killed or failed run from its checkpoint (bcdcore run "
                                                 "--resume; refused for a finished or live run)"),
        Binding("z", "maximize", "Maximise", tooltip="maximise a panel: the chart, then the blocks, then the log or "
                                                     "measure panel, then back"),
        Binding("L", "full_log", "Full log", tooltip="the whole log full screen: search, wrap, follow"),
    ]
    PANELS = ("chart", "blocks", "side")

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.panel = "log"  # "log" or a measurement unit
        self.follower = None
        self._summary = None

    def compose(self) -> ComposeResult:
        row = self.ws.model.rows.get(self.run_id)
        title = row.display if row is not None and not row.job_id else row.recipe if row is not None else self.run_id
        tags = f"  [{' '.join(row.tags)}]" if row is not None and row.tags else ""
        yield TopBar(f"Run {printable(title)}{printable(tags)}", id="topbar")
        yield StatusLines(id="summary")
        yield LineChart(id="chart")
        with Horizontal(id="lower"):
            yield DataTable(id="blocks", cursor_type="none", zebra_stripes=True, show_cursor=False)
            with ContentSwitcher(initial="log", id="side"):
                yield Log(id="log", max_lines=2000, auto_scroll=True)
                yield HeatMap(id="measures")
        yield KeyBar()

    def on_mount(self) -> None:
        blocks = self.query_one("#blocks", DataTable)
        for key, title in (("block", "blk"), ("steps", "steps"), ("residual", "residual"),
                           ("threshold", "thresh"), ("lambda", "λ"), ("gamma", "γ"), ("dist", "dist")):
            blocks.add_column(title, key=key)
        blocks.border_title = "blocks (latest round)"
        self.query_one("#side").border_title = "log"
        row = self.ws.model.rows.get(self.run_id)
        if row is not None and row.path is None:  # a launch without a run directory: its state, error, output
            self.query_one("#summary", StatusLines).set_lines(launch_summary(row))
            self.query_one("#log", Log).write_lines(self.ws.launch_output(self.run_id))
            return
        self.follower = self.ws.follow(self.run_id)
        self.poll(force=True)
        self.set_interval(FOLLOW_S, self.poll)  # one file read from an offset: faster than the app's refresh

    def on_resize(self) -> None:
        self.set_class(self.size.width < 120, "-narrow")  # the blocks panel takes two thirds: λ, γ, dist fit

    def tick(self) -> None:
        if self.follower is not None:
            self._draw_summary()  # the state may change without an event (a lost run)

    def poll(self, force: bool = False) -> None:
        if self.follower is None or (not force and not self.is_current):
            return
        result = self.follower.poll()
        if result.metrics or force:
            if self.metric not in self.follower.columns and self.follower.metric_names():
                self.metric = self.follower.metric_names()[0]
            self._draw_chart()
        if result.blocks or force:
            self._draw_blocks()
        if result.log_lines:
            self.query_one("#log", Log).write_lines(result.log_lines)
        if result.measures or force:
            self._draw_measures()
        self._draw_summary()

    def _draw_chart(self) -> None:
        if self.follower is None:
            return
        xs, ys = self.follower.series(self.metric, self.x_axis)
        chart = self.query_one("#chart", LineChart)
        chart.set_data([Series(self.metric, xs, ys)], log_y=self.log_y, x_label=self.x_axis)
        chart.border_title = self.chart_title(f" = {fmt_number(ys[-1])}" if ys else "")

    def _draw_blocks(self) -> None:
        table = self.query_one("#blocks", DataTable)
        table.clear()
        for event in self.follower.block_rows():
            table.add_row(*block_cells(event))
        rnd = self.follower.blocks_round
        table.border_title = f"blocks, round {rnd} (↓ stopped early)" if rnd else "blocks (none yet)"

    def _draw_measures(self) -> None:
        units = list(self.follower.measures)
        if self.panel != "log" and self.panel not in units:
            self.panel = "log"
        if self.panel == "log":
            return
        m = self.follower.measures[self.panel]
        matrix = as_matrix(m.value)
        notes = [f"{k}: {short(v)}" for k, v in m.extra.items()]
        if matrix is None:
            notes.insert(0, f"value: {short(m.value)}")
        if m.figure:
            notes.append(f"figure: {m.figure}")
        self.query_one("#measures", HeatMap).set_data(f"{m.unit}, round {m.round}", matrix, notes)

    def _draw_summary(self) -> None:
        boxes = self.query("#summary")
        if boxes:  # none while the screen is being torn down (the app's tick can come then)
            boxes.first(StatusLines).set_lines(run_summary(self.ws.model.rows.get(self.run_id), self.follower))

    # --- actions
    def chart_metrics(self) -> list[str]:
        return (self.follower.metric_names() if self.follower is not None else []) or ["train_loss"]

    def action_panel(self) -> None:
        if self.follower is None:
            return
        choices = ["log", *self.follower.measures]
        self.panel = choices[(choices.index(self.panel) + 1) % len(choices)] if self.panel in choices else "log"
        switcher = self.query_one("#side", ContentSwitcher)
        switcher.current = "log" if self.panel == "log" else "measures"
        switcher.border_title = "log" if self.panel == "log" else f"measure: {self.panel}"
        if len(choices) == 1:
            self.app.notify("no measurements in this run yet ([[measure]] in the recipe)")
        self._draw_measures()

    def action_maximize(self) -> None:
        """Cycle: chart, blocks, the side panel (log or measure), none."""
        current = self.maximized.id if self.maximized is not None else None
        order = [*self.PANELS, None]
        nxt = order[(order.index(current) + 1) % len(order)] if current in order else order[0]
        if nxt is None:
            self.minimize()
        else:
            self.maximized = self.query_one(f"#{nxt}")

    def action_full_log(self) -> None:
        if self.follower is None:
            self.app.notify("a launch without a run directory has no log; its output is on this screen",
                            severity="warning")
            return
        self.app.push_screen(LogScreen(self.run_id))

    def action_kill(self) -> None:
        self.run_action(self.run_id, "kill")

    def action_rerun(self) -> None:
        self.run_action(self.run_id, "rerun")

    def action_resume(self) -> None:
        self.run_action(self.run_id, "resume")
