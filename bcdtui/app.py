"""A first bcdtui: a live table of the runs in a runs directory. The full workstation is issue 4."""
from __future__ import annotations

import argparse
from pathlib import Path

from textual.app import App, ComposeResult
from textual.widgets import DataTable, Footer, Header

from bcdcore.rundir import default_runs_dir, effective_state, list_runs, metric_table, read_events, read_status


def run_rows(runs_dir: Path) -> list[tuple[str, str, str, str]]:
    """(run id, state, round/rounds, last train loss) per run: the headless twin of the table."""
    rows = []
    for path in list_runs(runs_dir):
        status = read_status(path)
        progress = status.get("progress") or {}
        losses = metric_table(read_events(path, "metric")).get("train_loss", [])
        rows.append((path.name, effective_state(status), f"{progress.get('round', 0)}/{progress.get('rounds', 0)}",
                     f"{losses[-1]:.4f}" if losses else ""))
    return rows


class RunsApp(App):
    TITLE = "bcdtui"
    BINDINGS = [("r", "refresh", "Refresh"), ("q", "quit", "Quit")]

    def __init__(self, runs_dir: Path) -> None:
        super().__init__()
        self.runs_dir = runs_dir

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="runs")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("run", "state", "round", "train_loss")
        self.action_refresh()
        self.set_interval(1.0, self.action_refresh)

    def action_refresh(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for row in run_rows(self.runs_dir):
            table.add_row(*row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bcdtui", description="Terminal workstation over run directories")
    parser.add_argument("--runs", type=Path, default=None, help="runs directory (default ./runs or $BCD_RUNS)")
    parser.add_argument("--recipes", type=Path, default=Path("recipes"), help="recipes directory")
    args = parser.parse_args(argv)
    RunsApp(args.runs or default_runs_dir()).run()
    return 0
