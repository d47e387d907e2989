"""Cluster jobs (F5): the queued and running jobs of `bcdcore sweep --slurm` sweeps, and cancelling one."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable

from bcdcore.rundir import printable
from bcdtui.cluster import ClusterJobs
from bcdtui.screens.base import WsScreen
from bcdtui.screens.dialogs import ConfirmScreen
from bcdtui.widgets import KeyBar, TopBar


class ClusterScreen(WsScreen):
    BINDINGS = [
        Binding("x", "cancel_job", "Cancel job", tooltip="cancel the highlighted cluster job (scancel)"),
        Binding("a", "toggle_all", "All/live", tooltip="show every job, or only the queued and running ones"),
        Binding("escape", "app.pop_screen", "Back", tooltip="back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.model: ClusterJobs | None = None  # made on mount, from the app's runs directory
        self.live_only = True

    def compose(self) -> ComposeResult:
        yield TopBar("Cluster jobs", id="topbar")
        yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
        yield KeyBar()

    def on_mount(self) -> None:
        self.model = ClusterJobs(self.ws.runs_dir)
        table = self.query_one("#jobs", DataTable)
        for column in ClusterJobs.COLUMNS:
            table.add_column(column, key=column)
        self.tick()
        table.focus()

    def tick(self) -> None:
        if self.model is None:
            return
        table = self.query_one("#jobs", DataTable)
        cursor = table.cursor_row
        table.clear()
        rows = self.model.refresh(self.live_only)
        for row in rows:
            table.add_row(*(Text(printable(c)) for c in row.cells()))
        if not rows:
            table.add_row(Text("(no queued or running cluster jobs)" if self.live_only else "(no cluster jobs)",
                               style="dim"), *([""] * (len(ClusterJobs.COLUMNS) - 1)))
        table.border_title = "; ".join(self.model.problems) or ("live jobs" if self.live_only else "all jobs")
        table.move_cursor(row=min(cursor, max(0, len(rows) - 1)))

    def action_toggle_all(self) -> None:
        self.live_only = not self.live_only
        self.tick()

    def action_cancel_job(self) -> None:
        rows = self.model.rows if self.model is not None else []
        cursor = self.query_one("#jobs", DataTable).cursor_row
        if not rows or cursor >= len(rows):
            return
        row = rows[cursor]

        def done(yes: bool | None) -> None:
            if yes:
                self.app.notify(self.model.cancel(row))
                self.tick()

        self.app.push_screen(ConfirmScreen(f"Cancel cluster job {row.job.job_id} ({row.sweep})?"), done)
