"""The screens. Each one lays out widgets and turns keys into calls on the app's `Workstation` (`self.ws`);
state and logic live in bcdtui.workstation / runs / runner / tailer / diff / recipes."""
from __future__ import annotations

import math
import subprocess
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import (Button, ContentSwitcher, DataTable, Input, Label, Log, Select, SelectionList, Static,
                             TextArea, Tree)

from bcdtui.charts import as_matrix
from bcdtui.recipes import RecipeError, list_recipes, parse_overrides, read_recipe_text
from bcdtui.runs import (COLUMN_TITLES, COLUMNS, RunRow, fmt_duration, fmt_number, printable, progress_bar,
                         row_cells)
from bcdtui.tailer import X_AXES, number
from bcdtui.widgets import HeatMap, KeyBar, LineChart, RecipeEditor, StatusLines, TopBar
from bcdtui.workstation import ActionError, Comparison

if TYPE_CHECKING:
    from bcdtui.workstation import Workstation

FOLLOW_S = 0.1  # how often an open run (or comparison) reads its new events
NO_CHOICE = getattr(Select, "NULL", Select.BLANK)  # an empty Select's value (Textual 8 renamed BLANK to NULL)

STATE_STYLES = {"running": "bold #4fc3f7", "queued": "#b0bec5", "starting": "#b0bec5", "finished": "#81c784",
                "failed": "bold #e57373", "error": "bold #e57373", "killed": "#ffb74d", "lost": "bold #ba68c8",
                "unreadable": "bold #e57373"}


def steady_cursors(screen) -> None:
    """Headless (tests, snapshots): no blinking cursors, so what is drawn does not depend on the moment."""
    if screen.app.is_headless:
        for widget in screen.query("Input, TextArea"):
            widget.cursor_blink = False


def _short(value, limit: int = 200) -> str:
    import json

    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def styled_state(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state.split(":", 1)[0], ""))  # "unreadable: <reason>" too


class WsScreen(Screen):
    """A screen with the app's workstation at hand and the shared top bar / key bar."""

    TITLE_TEXT = ""

    @property
    def ws(self) -> "Workstation":
        return self.app.ws  # type: ignore[attr-defined]

    def fail(self, exc: Exception) -> None:
        self.app.notify(str(exc), severity="error", timeout=8)

    def run_action(self, run_id: str | None, action: str) -> None:
        """kill / rerun / resume `run_id` through the workstation; the outcome becomes a notification."""
        if run_id is None:
            return
        try:
            if action == "kill":
                message = self.ws.kill(run_id)
            elif action == "rerun":
                self.ws.rerun(run_id)
                message = f"queued a rerun of {run_id}"
            else:
                self.ws.resume(run_id)
                message = f"queued: resume {run_id}"
        except ActionError as exc:
            self.fail(exc)
            return
        self.app.notify(message)
        self.app.refresh_now()  # type: ignore[attr-defined]

    def tick(self) -> None:
        """Called by the app after every workstation refresh while this screen is on top."""


# ----------------------------------------------------------------------------------------------------------
# runs

class RunsScreen(WsScreen):
    TITLE_TEXT = "Runs"
    BINDINGS = [
        Binding("enter", "open", "Open", priority=True, tooltip="open the run: live chart, blocks, log, status"),
        Binding("l", "launch", "Launch", tooltip="launch a recipe (overrides, GPUs, per-GPU limit, sweep preview)"),
        Binding("k", "kill", "Kill",
                tooltip="SIGTERM to the run's process group (it checkpoints, ends killed), SIGKILL after the "
                        "grace period; cancels a queued launch"),
        Binding("r", "rerun", "Rerun", tooltip="run the same resolved recipe again as a new run"),
        Binding("u", "resume", "Resume", tooltip="continue a killed run from its checkpoint (bcdcore run --resume)"),
        Binding("d", "delete", "Delete", tooltip="delete the run directory (asks first; refused while it runs)"),
        Binding("space", "mark", "Mark", tooltip="mark or unmark the run for compare"),
        Binding("c", "compare", "Compare", tooltip="compare the marked runs: overlaid curves and recipe differences"),
        Binding("slash", "filter", "Filter", key_display="/",
                tooltip="filter by words in the id, recipe, state or GPU (escape clears)"),
        Binding("f", "state_filter", "States", tooltip="cycle the state filter: all, active, finished, problems"),
        Binding("s", "sort", "Sort", tooltip="sort by the next column"),
        Binding("S", "reverse", "Reverse", tooltip="reverse the sort order"),
        Binding("e", "recipes", "Recipes", show=False, tooltip="the recipes screen"),
        Binding("q", "app.quit_app", "Quit", show=False, tooltip="quit, as ctrl+q"),
    ]
    DEFAULT_CSS = """
    RunsScreen #filter { dock: top; display: none; height: 3; }
    RunsScreen #filter.-shown { display: block; }
    RunsScreen #runs { height: 1fr; }
    RunsScreen #runs-info { height: 1; color: $text-muted; padding: 0 1; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.marked: list[str] = []
        self._cells: dict[str, tuple] = {}
        self._dirty: set[str] = set()

    def compose(self) -> ComposeResult:
        yield TopBar(f"Runs in {self.ws.runs_dir}", id="topbar")
        yield Input(placeholder="filter: words that the run id, recipe, state or GPU contain", id="filter")
        table: DataTable = DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        table.fixed_columns = 1
        yield table
        yield Static("", id="runs-info")
        yield KeyBar()

    def on_mount(self) -> None:
        steady_cursors(self)
        table = self.query_one("#runs", DataTable)
        for col in COLUMNS:
            table.add_column(COLUMN_TITLES[col], key=col)
        self.rebuild()
        table.focus()

    # --- syncing the table with the model
    # The DataTable measures every cell it is given, so the table is kept in step row by row (add, update,
    # remove) and reordered with DataTable.sort, never cleared and refilled: at 1,000 runs a refill costs
    # about half a second of measuring, an update a few milliseconds.
    def note(self, result) -> None:
        """The app's refresh result; applied now when on top, else when this screen is shown again."""
        self._dirty |= result.added | result.removed | result.changed
        if self.is_current:
            self.sync()

    def on_screen_resume(self) -> None:
        self.sync()

    def cells(self, row: RunRow) -> tuple:
        c = row_cells(row)
        run = Text(("● " if row.id in self.marked else "") + c["run"], style="bold" if row.id in self.marked else "")
        # Text, never str: a DataTable reads a str as markup, and a run's recipe or GPU comes from its files
        return (run, styled_state(c["state"]), *(Text(c[k]) for k in COLUMNS[2:]))

    def sync(self, ids: set[str] | None = None) -> None:
        """Bring the rows named in `ids` (default: those the refreshes marked) in line with the model."""
        if ids is None:
            ids, self._dirty = self._dirty, set()
        if not ids:
            self._update_info()
            return
        model = self.ws.model
        table = self.query_one("#runs", DataTable)
        sort_index = COLUMNS.index(model.sort_column)
        reorder = False
        position = {r.id: i for i, r in enumerate(model.view())}
        for run_id in sorted(ids, key=lambda r: (position.get(r, -1), r)):  # new rows arrive in view order
            row = model.rows.get(run_id)
            shown = run_id in self._cells
            if row is None or not model.matches(row):
                if shown:
                    table.remove_row(run_id)
                    del self._cells[run_id]
                continue
            new = self.cells(row)
            if not shown:
                table.add_row(*new, key=run_id)
                reorder = True
            else:
                old = self._cells[run_id]
                merged = []
                for col, a, b in zip(COLUMNS, old, new):
                    if a != b:
                        table.update_cell(run_id, col, b)
                    merged.append(b if a != b else a)  # the objects the table holds (reorder keys on them)
                reorder |= old[sort_index] != new[sort_index]
                new = tuple(merged)
            self._cells[run_id] = new
        if reorder:
            self.reorder()
        self._update_info()

    def reorder(self) -> None:
        """Order the table's rows as the model's view (sort column and direction), keeping the cursor's run."""
        table = self.query_one("#runs", DataTable)
        current = self.current_id()
        position = {id(self._cells[r.id][0]): i for i, r in enumerate(self.ws.model.view()) if r.id in self._cells}
        table.sort("run", key=lambda cell: position.get(id(cell), len(position)))
        if current in self._cells:
            table.move_cursor(row=table.get_row_index(current), animate=False)

    def rebuild(self) -> None:
        """Re-check every run against the filter and the order (after a filter or sort change)."""
        self.sync(set(self.ws.model.rows) | set(self._cells))
        self.reorder()
        self._dirty.clear()

    def _update_info(self) -> None:
        model = self.ws.model
        shown = len(self._cells)
        arrow = "↓" if model.sort_reverse else "↑"
        parts = [f"{shown} of {len(model.rows)} runs", f"sort {COLUMN_TITLES[model.sort_column]} {arrow}",
                 f"states: {model.state_filter}"]
        if model.filter_text:
            parts.append(f"filter: {model.filter_text!r}")
        if self.marked:
            parts.append(f"{len(self.marked)} marked")
        info = " · ".join(parts)
        if info != getattr(self, "_info", None):
            self._info = info
            self.query_one("#runs-info", Static).update(info)

    def current_id(self) -> str | None:
        table = self.query_one("#runs", DataTable)
        if not table.row_count:
            return None
        try:
            return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - an empty or changing table
            return None

    def _current(self) -> str | None:
        run_id = self.current_id()
        if run_id is None:
            self.app.notify("no run selected", severity="warning")
        return run_id

    # --- actions
    @on(DataTable.RowSelected, "#runs")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        box = self.query_one("#filter", Input)
        if box.has_focus:
            self._filter_done(Input.Submitted(box, box.value))
            return
        run_id = self._current()
        if run_id is None:
            return
        row = self.ws.model.rows.get(run_id)
        if row is None or row.path is None:
            msg = row.error if row is not None and row.error else "this launch has no run directory yet"
            self.app.notify(msg, severity="error" if row is not None and row.error else "information")
            return
        self.app.push_screen(RunScreen(run_id))

    def action_launch(self) -> None:
        self.app.push_screen(LaunchScreen(), self._launched)

    def _launched(self, jobs) -> None:
        if jobs:
            self.app.notify(f"queued {len(jobs)} run{'s' if len(jobs) > 1 else ''}")
            self.app.refresh_now()

    def action_kill(self) -> None:
        self.run_action(self._current(), "kill")

    def action_rerun(self) -> None:
        self.run_action(self._current(), "rerun")

    def action_resume(self) -> None:
        self.run_action(self._current(), "resume")

    def action_delete(self) -> None:
        run_id = self._current()
        if run_id is None:
            return
        row = self.ws.model.rows.get(run_id)
        what = (f"the launch {row.recipe}" if row is not None and row.job_id
                else f"run {printable(run_id)} and all its files")
        self.app.push_screen(ConfirmScreen(f"Delete {what}?"), partial(self._delete_confirmed, run_id))

    def _delete_confirmed(self, run_id: str, yes: bool | None) -> None:
        if not yes:
            return
        try:
            self.app.notify(self.ws.delete(run_id))
            if run_id in self.marked:
                self.marked.remove(run_id)
            self.app.refresh_now()
        except ActionError as exc:
            self.fail(exc)

    def action_mark(self) -> None:
        run_id = self._current()
        if run_id is None:
            return
        if run_id in self.marked:
            self.marked.remove(run_id)
        else:
            self.marked.append(run_id)
        self._dirty.add(run_id)
        self.sync()
        table = self.query_one("#runs", DataTable)
        if table.cursor_row < table.row_count - 1:
            table.move_cursor(row=table.cursor_row + 1)

    def action_compare(self) -> None:
        ids = [r for r in self.marked if r in self.ws.model.rows]
        if len(ids) < 2:
            self.app.notify("mark two or more runs with space, then press c", severity="warning")
            return
        try:
            comparison = self.ws.compare(ids)
        except ActionError as exc:
            self.fail(exc)
            return
        self.app.push_screen(CompareScreen(comparison))

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("-shown")
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.ws.model.filter_text = event.value
        self.rebuild()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        if not event.value:
            event.input.remove_class("-shown")
        self.query_one("#runs", DataTable).focus()

    def key_escape(self) -> None:
        box = self.query_one("#filter", Input)
        if box.has_focus or box.has_class("-shown"):
            box.value = ""
            box.remove_class("-shown")
            self.query_one("#runs", DataTable).focus()

    def action_state_filter(self) -> None:
        self.ws.model.cycle_state_filter()
        self.rebuild()

    def action_sort(self) -> None:
        self.ws.model.cycle_sort()
        self.rebuild()

    def action_reverse(self) -> None:
        model = self.ws.model
        model.sort_by(model.sort_column, not model.sort_reverse)
        self.rebuild()

    @on(DataTable.HeaderSelected, "#runs")
    def _header(self, event: DataTable.HeaderSelected) -> None:
        self.ws.model.sort_by(str(event.column_key.value))
        self.rebuild()

    def action_recipes(self) -> None:
        self.app.action_show_recipes()


# ----------------------------------------------------------------------------------------------------------
# a metric chart's keys (the run screen and the compare screen)

CHART_BINDINGS = [
    Binding("escape", "back", "Back", tooltip="back to the previous screen"),
    Binding("y", "metric", "Metric", tooltip="chart the next metric (train_loss, val_loss, val_acc, ...)"),
    Binding("x", "x_axis", "X axis", tooltip="x axis: round, grad_evals, wall_s, samples, flops"),
    Binding("g", "log_y", "Log y", tooltip="toggle a logarithmic y axis"),
]


class ChartAxes:
    """Mixin of a screen with one metric chart: the back key, and the metric / x axis / log y keys, which change
    what is charted and redraw. The screen lists CHART_BINDINGS in its BINDINGS (kept there, not here, so that
    each screen's key bar order stays explicit) and provides `chart_metrics()` and `_draw_chart()`."""

    # the chart at first: train_loss against rounds, linear y (class defaults; the keys set them per screen)
    metric = "train_loss"
    x_axis = "round"
    log_y = False

    def chart_metrics(self) -> list[str]:
        """The metric names the y key cycles through."""
        raise NotImplementedError

    def _draw_chart(self) -> None:
        raise NotImplementedError

    def chart_title(self, value: str = "") -> str:
        """The chart's border title: the metric (then `value`, e.g. its latest one), the x axis, log y or not."""
        return f"{self.metric}{value} vs {self.x_axis}{' (log y)' if self.log_y else ''}"

    def action_back(self) -> None:
        self.app.pop_screen()  # type: ignore[attr-defined]

    def action_metric(self) -> None:
        names = self.chart_metrics()
        self.metric = names[(names.index(self.metric) + 1) % len(names)] if self.metric in names else names[0]
        self._draw_chart()

    def action_x_axis(self) -> None:
        self.x_axis = X_AXES[(X_AXES.index(self.x_axis) + 1) % len(X_AXES)]
        self._draw_chart()

    def action_log_y(self) -> None:
        self.log_y = not self.log_y
        self._draw_chart()


# ----------------------------------------------------------------------------------------------------------
# one run

class RunScreen(ChartAxes, WsScreen):
    BINDINGS = [
        *CHART_BINDINGS,
        Binding("m", "panel", "Log/measures",
                tooltip="switch the side panel: log tail, then each measurement's heat map"),
        Binding("k", "kill", "Kill",
                tooltip="SIGTERM to the run's process group (it checkpoints, ends killed), SIGKILL after the "
                        "grace period; cancels a queued launch"),
        Binding("r", "rerun", "Rerun", tooltip="run the same resolved recipe again as a new run"),
        Binding("u", "resume", "Resume", tooltip="continue a killed run from its checkpoint (bcdcore run --resume)"),
    ]
    DEFAULT_CSS = """
    RunScreen #summary { height: auto; max-height: 3; padding: 0 1; }
    RunScreen #chart { height: 1fr; min-height: 8; border: round $primary 40%; border-title-color: $text; }
    RunScreen #lower { height: 40%; min-height: 7; }
    RunScreen #blocks { width: 1fr; height: 100%; border: round $primary 40%; border-title-color: $text; }
    RunScreen #side { width: 1fr; height: 100%; border: round $primary 40%; border-title-color: $text; }
    RunScreen #log { height: 100%; }
    RunScreen #measures { height: 100%; }
    """

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.panel = "log"  # "log" or a measurement unit
        self.follower = None
        self._summary = None

    def compose(self) -> ComposeResult:
        yield TopBar(f"Run {printable(self.run_id)}", id="topbar")
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
        for key, title in (("block", "blk"), ("steps", "steps"), ("early", "early"), ("residual", "residual"),
                           ("threshold", "thresh"), ("lambda", "λ"), ("gamma", "γ"), ("dist", "dist")):
            blocks.add_column(title, key=key)
        blocks.border_title = "blocks (latest round)"
        self.query_one("#side").border_title = "log"
        self.follower = self.ws.follow(self.run_id)
        self.poll(force=True)
        self.set_interval(FOLLOW_S, self.poll)  # one file read from an offset: faster than the app's refresh

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
        xs, ys = self.follower.series(self.metric, self.x_axis)
        from bcdtui.charts import Series

        chart = self.query_one("#chart", LineChart)
        chart.set_data([Series(self.metric, xs, ys)], log_y=self.log_y, x_label=self.x_axis)
        chart.border_title = self.chart_title(f" = {fmt_number(ys[-1])}" if ys else "")

    def _draw_blocks(self) -> None:
        table = self.query_one("#blocks", DataTable)
        table.clear()
        for e in self.follower.block_rows():
            res, thr = number(e.get("residual")), number(e.get("threshold"))
            met = math.isfinite(thr) and res <= thr
            table.add_row(str(e.get("block", "")), str(e.get("inner_steps", "")),
                          Text("yes", style="#81c784") if e.get("stopped_early") else "no",
                          Text(fmt_number(res, 3), style="#81c784" if met else ""),
                          fmt_number(thr, 3) if math.isfinite(thr) else "off", fmt_number(number(e.get("lambda")), 3),
                          fmt_number(number(e.get("gamma")), 2), fmt_number(number(e.get("dist")), 3))
        rnd = self.follower.blocks_round
        table.border_title = f"blocks, round {rnd}" if rnd else "blocks (none yet)"

    def _draw_measures(self) -> None:
        units = list(self.follower.measures)
        if self.panel != "log" and self.panel not in units:
            self.panel = "log"
        if self.panel == "log":
            return
        m = self.follower.measures[self.panel]
        matrix = as_matrix(m.value)
        notes = [f"{k}: {_short(v)}" for k, v in m.extra.items()]
        if matrix is None:
            notes.insert(0, f"value: {_short(m.value)}")
        if m.figure:
            notes.append(f"figure: {m.figure}")
        self.query_one("#measures", HeatMap).set_data(f"{m.unit}, round {m.round}", matrix, notes)

    def _draw_summary(self) -> None:
        row = self.ws.model.rows.get(self.run_id)
        f = self.follower
        status = f.status
        state = row.state if row else status.get("state", "unknown")
        progress = status.get("progress") or {}
        rnd, rounds = progress.get("round", 0), progress.get("rounds", 0)  # checked ints (bcdcore.records)
        line1 = styled_state(state)
        line1.append("  ")
        if rounds:
            line1.append(f"round {rnd}/{rounds} {progress_bar(rnd / rounds)}  ")
        if row is not None and state == "running" and math.isfinite(row.eta_s):
            line1.append(f"ETA {fmt_duration(row.eta_s)}  ")
        start = f.start
        bits = []
        if start:
            bits.append(f"{start.get('device', '?')} · ops {start.get('backend', '?')} · "
                        f"{start.get('n_blocks', '?')} blocks {start.get('block_sizes', '')}")
        if status.get("gpu"):
            bits.append(f"GPU {status['gpu']}")
        if row is not None and row.holder:
            bits.append(f"writer {row.holder} (holds the lock)")
        elif status.get("host"):
            bits.append(f"{status['host']}:{status.get('pid', '?')}")
        line1.append(" · ".join(bits), style="dim")
        last = f.last_metrics()
        line2 = Text()
        for name in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc"):
            if name in last:
                line2.append(f"{name} ", style="dim")
                line2.append(f"{fmt_number(last[name])}  ")
        for name, label in (("grad_evals", "grad evals"), ("wall_s", "wall")):
            if name in last:
                line2.append(f"{label} ", style="dim")
                line2.append(fmt_duration(last[name]) if name == "wall_s" else f"{last[name]:.0f}")
                line2.append("  ")
        lines = [line1, line2]
        error = status.get("error") or (row.error if row is not None else "")
        if state == "unreadable":
            lines.append(Text(f"unreadable: {error}", style="bold #e57373"))
        elif error and state in ("failed", "lost", "killed", "error"):
            lines.append(Text(f"error: {error}", style="bold #e57373"))
        elif f.end:
            lines.append(Text(f"ended {f.end.get('state', '')}: {f.end.get('reason') or ''}",
                              style=STATE_STYLES.get(str(f.end.get("state")), "")))
        if f.note:  # bad event lines skipped: said on the third line, after what it already says
            note = Text(f"skipped: {f.note}", style="#ffb74d")
            if len(lines) > 2:
                lines[2].append("  ")
                lines[2].append_text(note)
            else:
                lines.append(note)
        self.query_one("#summary", StatusLines).set_lines(lines)

    # --- actions
    def chart_metrics(self) -> list[str]:
        return self.follower.metric_names() or ["train_loss"]

    def action_panel(self) -> None:
        choices = ["log", *self.follower.measures]
        self.panel = choices[(choices.index(self.panel) + 1) % len(choices)] if self.panel in choices else "log"
        switcher = self.query_one("#side", ContentSwitcher)
        switcher.current = "log" if self.panel == "log" else "measures"
        switcher.border_title = "log" if self.panel == "log" else f"measure: {self.panel}"
        if len(choices) == 1:
            self.app.notify("no measurements in this run yet ([[measure]] in the recipe)")
        self._draw_measures()

    def action_kill(self) -> None:
        self.run_action(self.run_id, "kill")

    def action_rerun(self) -> None:
        self.run_action(self.run_id, "rerun")

    def action_resume(self) -> None:
        self.run_action(self.run_id, "resume")


# ----------------------------------------------------------------------------------------------------------
# compare

class CompareScreen(ChartAxes, WsScreen):
    BINDINGS = [
        *CHART_BINDINGS,
        Binding("d", "toggle_diff", "All keys/diff", tooltip="recipe table: differences only, or every key"),
    ]
    DEFAULT_CSS = """
    CompareScreen #cmp-chart { height: 1fr; min-height: 8; border: round $primary 40%; border-title-color: $text; }
    CompareScreen #diff { height: 1fr; border: round $primary 40%; border-title-color: $text; }
    """

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
        from bcdtui.diff import diff_runs

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


# ----------------------------------------------------------------------------------------------------------
# recipes

class RecipesScreen(WsScreen):
    BINDINGS = [
        Binding("escape", "back", "Back", tooltip="back to the previous screen"),
        Binding("ctrl+s", "save", "Save", priority=True, tooltip="save the recipe"),
        Binding("ctrl+n", "new", "New", priority=True, tooltip="new recipe from the template"),
        Binding("ctrl+l", "launch", "Launch", priority=True,
                tooltip="launch a recipe (overrides, GPUs, per-GPU limit, sweep preview)"),
        Binding("ctrl+t", "check", "Full check", priority=True,
                tooltip="bcdcore check: builds the model and opens the data"),
        Binding("ctrl+o", "external_editor", "$EDITOR", priority=True,
                tooltip="open the recipe in $VISUAL / $EDITOR"),
    ]
    DEFAULT_CSS = """
    RecipesScreen #recipe-tree { width: 30; border: round $primary 40%; border-title-color: $text; }
    RecipesScreen #recipe-pane { width: 1fr; }
    RecipesScreen #editor { border: round $primary 40%; border-title-color: $text; }
    RecipesScreen #validation { height: auto; max-height: 3; padding: 0 1; }
    RecipesScreen #validation.-error { color: $error; text-style: bold; }
    RecipesScreen #validation.-ok { color: $success; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.path: Path | None = None
        self.saved_text = ""
        self._validate_timer = None
        self._loading = False

    def compose(self) -> ComposeResult:
        yield TopBar("Recipes", id="topbar")
        with Horizontal():
            tree: Tree = Tree("recipes", id="recipe-tree")
            tree.show_root = False
            yield tree
            with Vertical(id="recipe-pane"):
                yield RecipeEditor.code_editor("", language=_toml_language(), id="editor", soft_wrap=False,
                                               show_line_numbers=True, theme="monokai")
                yield Static("select a recipe on the left (enter edits it); ctrl+n makes a new one",
                             id="validation")
        yield KeyBar()

    def on_mount(self) -> None:
        steady_cursors(self)
        self.query_one("#recipe-tree").border_title = str(self.ws.recipes_dir)
        self.reload_tree()
        self.query_one("#recipe-tree", Tree).focus()

    def reload_tree(self, select: Path | None = None) -> None:
        tree = self.query_one("#recipe-tree", Tree)
        tree.clear()
        root_dir = self.ws.recipes_dir
        tree.root.data = root_dir
        folders = {Path("."): tree.root}
        target = None
        for path in list_recipes(root_dir):
            rel = path.relative_to(root_dir)
            parent = Path(".")
            for part in rel.parts[:-1]:
                child = parent / part
                if child not in folders:
                    folders[child] = folders[parent].add(part + "/", data=None, expand=True)
                parent = child
            node = folders[parent].add_leaf(rel.name, data=path)
            if select is not None and path.resolve() == Path(select).resolve():
                target = node
        tree.root.expand()
        target = target or (tree.root.children[0] if tree.root.children else None)
        if target is not None:
            self.call_after_refresh(tree.move_cursor, target)

    @property
    def dirty(self) -> bool:
        return self.path is not None and self.query_one("#editor", RecipeEditor).text != self.saved_text

    def load(self, path: Path) -> None:
        try:
            text = read_recipe_text(path)
        except RecipeError as exc:
            self.fail(exc)
            return
        self.path, self.saved_text = path, text
        editor = self.query_one("#editor", RecipeEditor)
        self._loading = True
        editor.load_text(text)
        self._loading = False
        self._set_title()
        result = self.validate_now()
        if result is not None and result.line:  # show the offending line
            editor.scroll_to(y=max(0, result.line - 4), animate=False)

    def _set_title(self) -> None:
        editor = self.query_one("#editor", RecipeEditor)
        name = self.ws.recipe_source(self.path) if self.path else ""
        editor.border_title = f"{name}{' ● modified' if self.dirty else ''}"

    @on(Tree.NodeHighlighted, "#recipe-tree")
    def _highlighted(self, event: Tree.NodeHighlighted) -> None:
        path = event.node.data
        if isinstance(path, Path) and path.is_file() and not self.dirty and path != self.path:
            self.load(path)

    @on(Tree.NodeSelected, "#recipe-tree")
    def _selected(self, event: Tree.NodeSelected) -> None:
        path = event.node.data
        if not (isinstance(path, Path) and path.is_file()):
            return
        if path != self.path and self.dirty:
            self.app.push_screen(ConfirmScreen(f"Discard the unsaved changes to {self.ws.recipe_source(self.path)}?"),
                                 lambda yes: yes and (self.load(path), self.query_one("#editor").focus()))
            return
        if path != self.path:
            self.load(path)
        self.query_one("#editor", RecipeEditor).focus()

    @on(RecipeEditor.Changed, "#editor")
    def _edited(self, event) -> None:
        self._set_title()
        if self._validate_timer is not None:
            self._validate_timer.stop()
        self._validate_timer = self.set_timer(0.15, self.validate_now)

    def validate_now(self):
        if self.path is None:
            return None
        editor = self.query_one("#editor", RecipeEditor)
        result = self.ws.validate(editor.text, self.path)
        editor.set_error_line(result.line)
        box = self.query_one("#validation", Static)
        box.set_class(not result.ok, "-error")
        box.set_class(result.ok, "-ok")
        prefix = "✓ " if result.ok else "✗ "
        box.update(Text(prefix + result.message))
        return result

    # --- actions
    def action_back(self) -> None:
        editor = self.query_one("#editor", RecipeEditor)
        if editor.has_focus:
            self.query_one("#recipe-tree", Tree).focus()
        else:
            self.app.action_show_runs()

    def action_save(self) -> bool:
        if self.path is None:
            self.app.notify("nothing to save: select or create a recipe first", severity="warning")
            return False
        text = self.query_one("#editor", RecipeEditor).text
        try:
            self.ws.save_recipe(self.path, text)
        except OSError as exc:
            self.fail(exc)
            return False
        self.saved_text = text
        self._set_title()
        result = self.validate_now()
        self.app.notify(f"saved {self.ws.recipe_source(self.path)}" + ("" if result.ok else " (it has an error)"),
                        severity="information" if result.ok else "warning")
        return True

    def action_new(self) -> None:
        self.app.push_screen(PromptScreen("New recipe name (a file in the recipes directory):", "my_recipe"),
                             self._new_named)

    def _new_named(self, name: str | None) -> None:
        if not name:
            return
        try:
            path = self.ws.new_recipe(name)
        except ActionError as exc:
            self.fail(exc)
            return
        self.reload_tree(select=path)
        self.load(path)
        self.query_one("#editor", RecipeEditor).focus()

    def action_launch(self) -> None:
        if self.path is None:
            self.app.notify("select a recipe to launch", severity="warning")
            return
        if self.dirty and not self.action_save():
            return
        self.app.push_screen(LaunchScreen(self.path), self._launched)

    def _launched(self, jobs) -> None:
        if jobs:
            self.app.notify(f"queued {len(jobs)} run{'s' if len(jobs) > 1 else ''}; F2 shows the runs")
            self.app.refresh_now()

    def action_check(self) -> None:
        if self.path is None:
            return
        if self.dirty and not self.action_save():
            return
        box = self.query_one("#validation", Static)
        box.update(Text("… bcdcore check (builds the model, opens the data)"))
        path = self.path
        self.run_worker(partial(self._check_worker, path), thread=True, exclusive=True, group="check")

    def _check_worker(self, path: Path) -> None:
        ok, line = self.ws.check(path)
        self.app.call_from_thread(self._checked, path, ok, line)

    def _checked(self, path: Path, ok: bool, line: str) -> None:
        if path != self.path:
            return
        box = self.query_one("#validation", Static)
        box.set_class(not ok, "-error")
        box.set_class(ok, "-ok")
        box.update(Text(("✓ full check: " if ok else "✗ full check: ") + line))
        if not ok:
            from bcdtui.recipes import error_line

            self.query_one("#editor", RecipeEditor).set_error_line(error_line(line, str(path))
                                                                  or error_line(line, self.ws.recipe_source(path)))

    def action_external_editor(self) -> None:
        if self.path is None:
            return
        if self.dirty and not self.action_save():
            return
        from bcdtui.recipes import editor_command

        cmd = editor_command(self.path)
        try:
            with self.app.suspend():
                subprocess.call(cmd)
        except Exception as exc:  # noqa: BLE001 - headless (no terminal to hand over) or a missing editor
            self.app.notify(f"could not open {cmd[0]}: {exc}", severity="error")
            return
        self.load(self.path)


def _toml_language() -> str | None:
    """"toml" when Textual can highlight it (tree-sitter and tree-sitter-toml installed), else plain text."""
    return "toml" if "toml" in TextArea().available_languages else None


# ----------------------------------------------------------------------------------------------------------
# launch dialog

class LaunchScreen(ModalScreen):
    """Recipe, overrides, slots (GPUs, or the CPU), per-slot limit and the plan: what will start where."""

    BINDINGS = [
        Binding("ctrl+l", "launch", "Launch", priority=True,
                tooltip="start: queue the run(s); each starts when its slot has room"),
        Binding("escape", "cancel", "Cancel", tooltip="close without launching"),
    ]
    DEFAULT_CSS = """
    LaunchScreen { align: center middle; }
    LaunchScreen #dialog { width: 100; max-width: 96%; height: auto; max-height: 96%; border: thick $primary;
                           background: $surface; padding: 0 1; }
    LaunchScreen .row { height: auto; margin-top: 1; }
    LaunchScreen .label { width: 11; }
    LaunchScreen #recipe, LaunchScreen #overrides { width: 1fr; }
    LaunchScreen #slots { height: auto; max-height: 4; width: 1fr; }
    LaunchScreen #per-slot { width: 8; }
    LaunchScreen #queue-info { width: 1fr; padding: 0 1; color: $text-muted; }
    LaunchScreen #plan { height: auto; max-height: 8; margin-top: 1; }
    LaunchScreen #plan.-error { color: $error; }
    LaunchScreen #buttons { height: 1; align-horizontal: right; margin-top: 1; }
    LaunchScreen #buttons Button { margin-left: 2; }
    """

    def __init__(self, recipe: Path | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.plan = None

    @property
    def ws(self) -> "Workstation":
        return self.app.ws  # type: ignore[attr-defined]

    def compose(self) -> ComposeResult:
        ws = self.ws
        files = list_recipes(ws.recipes_dir)
        options = [(ws.recipe_source(p), p) for p in files]
        if self.recipe is not None and all(p.resolve() != Path(self.recipe).resolve() for p in files):
            options.insert(0, (ws.recipe_source(self.recipe), Path(self.recipe)))
        value = next((p for _, p in options if self.recipe is not None
                      and p.resolve() == Path(self.recipe).resolve()), options[0][1] if options else NO_CHOICE)
        usage = ws.slot_usage()
        with Vertical(id="dialog"):
            yield Label("[b]Launch[/b]  (ctrl+l starts, escape cancels)")
            with Horizontal(classes="row"):
                yield Label("recipe", classes="label")
                yield Select(options, value=value, allow_blank=not options, id="recipe", prompt="no recipes found",
                             compact=True)
            with Horizontal(classes="row"):
                yield Label("overrides", classes="label")
                yield Input(placeholder="algorithm.K=5 run.seed=1  (KEY=VALUE, space separated)", id="overrides",
                            compact=True)
            with Horizontal(classes="row"):
                yield Label("GPUs" if any(s.is_gpu for s in ws.slots) else "slots", classes="label")
                yield SelectionList(*[(f"{s.label}  [{usage.get(s.key, 0)} running]", s.key, True)
                                      for s in ws.slots], id="slots", compact=True)
            with Horizontal(classes="row"):
                yield Label("per slot", classes="label")
                yield Input(str(ws.runner.per_slot), id="per-slot", type="integer", compact=True)
                yield Static("", id="queue-info")
            yield Static("", id="plan")
            with Horizontal(id="buttons"):
                yield Button("Launch ^l", variant="primary", id="launch", compact=True)
                yield Button("Cancel esc", id="cancel", compact=True)

    def on_mount(self) -> None:
        steady_cursors(self)
        self.update_plan()
        self.query_one("#overrides", Input).focus()

    def choices(self) -> tuple[Path | None, list[str], list[str], int]:
        recipe = self.query_one("#recipe", Select).value
        recipe = None if recipe is NO_CHOICE or recipe is Select.BLANK else Path(recipe)
        overrides = parse_overrides(self.query_one("#overrides", Input).value)
        slots = [str(s) for s in self.query_one("#slots", SelectionList).selected]
        raw = self.query_one("#per-slot", Input).value.strip()
        per = int(raw) if raw.isdigit() else self.ws.runner.per_slot
        return recipe, overrides, slots, per

    @on(Select.Changed)
    @on(Input.Changed)
    @on(SelectionList.SelectedChanged)
    def update_plan(self, event=None) -> None:
        box = self.query_one("#plan", Static)
        queue = len(self.ws.runner.queued())
        self.query_one("#queue-info", Static).update(f"queue: {queue} waiting · a run starts when its slot "
                                                     f"has fewer than this many running")
        self.plan = None
        try:
            recipe, overrides, slots, per = self.choices()
            if recipe is None:
                raise ActionError("no recipe: make one on the recipes screen (F3)")
            if not slots:
                raise ActionError("select at least one slot")
            plan = self.ws.plan(recipe, overrides)
        except Exception as exc:  # noqa: BLE001 - RecipeError / ActionError: shown as the plan
            box.add_class("-error")
            box.update(Text("✗ " + str(exc)))
            return
        self.plan = plan
        box.remove_class("-error")
        usage = self.ws.slot_usage()
        free = sum(max(0, per - usage.get(s, 0)) for s in slots)
        n = len(plan.runs)
        starts = min(n, free)
        lines = [Text(f"✓ {plan.summary}", style="green"),
                 Text(f"{n} run{'s' if n > 1 else ''}: {starts} start{'s' if starts == 1 else ''} now, "
                      f"{n - starts} wait{'s' if n - starts == 1 else ''} in the queue "
                      f"(slots {', '.join(slots)}, {per} per slot)")]
        lines += [Text("  " + escape(line), style="dim") for line in plan.describe(limit=5)]
        box.update(Text("\n").join(lines))

    @on(Input.Submitted, "#overrides")
    @on(Button.Pressed, "#launch")
    def action_launch(self) -> None:
        try:
            recipe, overrides, slots, per = self.choices()
            if recipe is None:
                raise ActionError("no recipe selected")
            jobs = self.ws.launch(recipe, overrides, slots=slots, per_slot=per)
        except Exception as exc:  # noqa: BLE001 - shown, the dialog stays open
            self.app.notify(str(exc), severity="error", timeout=8)
            self.update_plan()
            return
        self.dismiss(jobs)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


# ----------------------------------------------------------------------------------------------------------
# small dialogs

class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [
        Binding("y", "yes", "Yes", tooltip="yes"),
        Binding("n,escape", "no", "No", tooltip="no"),
    ]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen #box { width: 64; max-width: 96%; height: auto; border: thick $error; background: $surface;
                         padding: 1 2; }
    ConfirmScreen #buttons { height: 3; align-horizontal: right; margin-top: 1; }
    """

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def compose(self) -> ComposeResult:
        with Vertical(id="box"):
            yield Static(Text(self.message))
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed, "#yes")
    def action_yes(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#no")
    def action_no(self) -> None:
        self.dismiss(False)


class PromptScreen(ModalScreen):
    BINDINGS = [Binding("escape", "cancel", "Cancel", tooltip="close without launching")]
    DEFAULT_CSS = """
    PromptScreen { align: center middle; }
    PromptScreen #box { width: 64; max-width: 96%; height: auto; border: thick $primary; background: $surface;
                        padding: 1 2; }
    """

    def __init__(self, message: str, placeholder: str = "") -> None:
        super().__init__()
        self.message, self.placeholder = message, placeholder

    def compose(self) -> ComposeResult:
        with Vertical(id="box"):
            yield Label(self.message)
            yield Input(placeholder=self.placeholder, id="answer")

    def on_mount(self) -> None:
        steady_cursors(self)

    @on(Input.Submitted, "#answer")
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen):
    """F1: the key map of every screen (built from the screens' bindings, as the README key map is)."""

    BINDINGS = [Binding("escape,f1,q", "close", "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen #help { width: 90; max-width: 98%; height: 90%; border: thick $primary; background: $surface;
                       padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        from bcdtui.keymap import key_map_text

        with VerticalScroll(id="help"):
            yield Static(key_map_text())

    def on_mount(self) -> None:
        self.query_one("#help").border_title = "bcdtui keys (escape closes)"
        self.query_one("#help").focus()

    def action_close(self) -> None:
        self.dismiss(None)
