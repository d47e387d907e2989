"""The system panel (F4), as nvitop users expect: the machine's CPU and memory, per GPU utilisation, memory
and power, and per live run its CPU %, RSS and GPU memory. Sampling (driver calls, a subprocess, /proc reads)
runs in a worker thread every PERIOD_S; the UI thread only draws the latest snapshot."""
from __future__ import annotations

import threading

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static
from textual.worker import get_current_worker

from bcdtui.screens.base import WsScreen
from bcdtui.system import SystemMonitor, SystemSnapshot, local_runs
from bcdtui.system_view import GPU_COLUMNS, PROC_COLUMNS, gpu_cells, host_line, proc_cells
from bcdtui.widgets import KeyBar, TopBar

PERIOD_S = 1.0


class SystemScreen(WsScreen):
    BINDINGS = [Binding("escape", "back", "Back", tooltip="back to the previous screen")]

    def __init__(self, monitor: SystemMonitor, host: str) -> None:
        super().__init__()
        self.monitor = monitor
        self.host = host
        self.snapshot: SystemSnapshot | None = None
        self._stop = threading.Event()

    def compose(self) -> ComposeResult:
        yield TopBar("System", id="topbar")
        yield Static("sampling …", id="sys-host")
        yield DataTable(id="gpus", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="procs", cursor_type="row", zebra_stripes=True)
        yield KeyBar()

    def on_mount(self) -> None:
        gpus, procs = self.query_one("#gpus", DataTable), self.query_one("#procs", DataTable)
        for name in GPU_COLUMNS:
            gpus.add_column(name, key=name)
        for name in PROC_COLUMNS:
            procs.add_column(name, key=name)
        gpus.border_title = "GPUs"
        procs.border_title = "live runs on this machine"
        self.tick()
        procs.focus()
        self.sample_loop()

    def on_unmount(self) -> None:
        self._stop.set()

    def tick(self) -> None:
        """Hand the worker the live runs (a new list each time: the thread never sees one change)."""
        self.monitor.runs = local_runs(list(self.ws.model.rows.values()), self.host)

    @work(thread=True, exclusive=True, group="system")
    def sample_loop(self) -> None:
        worker = get_current_worker()
        while not worker.is_cancelled and not self._stop.is_set():
            snap = self.monitor.sample()
            try:
                self.app.call_from_thread(self.show, snap)
            except RuntimeError:  # the app is closing
                return
            self._stop.wait(PERIOD_S)

    def show(self, snap: SystemSnapshot) -> None:
        if not self.is_attached:
            return
        self.snapshot = snap
        self.query_one("#sys-host", Static).update(Text(host_line(snap)))
        gpus = self.query_one("#gpus", DataTable)
        gpus.display = bool(snap.gpus)  # a CPU-only machine: no GPU table at all, the host line says "no GPU"
        _fill(gpus, [gpu_cells(g) for g in snap.gpus])
        procs = self.query_one("#procs", DataTable)
        _fill(procs, [proc_cells(p) for p in snap.procs])
        if not snap.procs:
            procs.add_row(Text("no run is running on this machine", style="dim"), "", "", "", "")

    def action_back(self) -> None:
        self.app.pop_screen()


def _fill(table: DataTable, rows: list[list[str]]) -> None:
    """Replace the rows, keeping the cursor's index (columns auto-size to the new cells)."""
    at = table.cursor_row
    table.clear()
    for row in rows:
        table.add_row(*(Text(c) for c in row))
    if 0 <= at < table.row_count:
        table.move_cursor(row=at)
