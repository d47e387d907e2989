"""One run: its live chart, the blocks of the latest round, the log tail or a measurement's heat map."""
from __future__ import annotations

import math

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import ContentSwitcher, DataTable, Log

from bcdtui.charts import Series, as_matrix
from bcdtui.runs import fmt_duration, fmt_number, printable, progress_bar
from bcdtui.screens.base import CHART_BINDINGS, FOLLOW_S, STATE_STYLES, ChartAxes, WsScreen, short, styled_state
from bcdtui.tailer import number
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
        Binding("u", "resume", "Resume", tooltip="continue a killed run from its checkpoint (bcdcore run --resume)"),
    ]

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
        notes = [f"{k}: {short(v)}" for k, v in m.extra.items()]
        if matrix is None:
            notes.insert(0, f"value: {short(m.value)}")
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
