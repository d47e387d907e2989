"""What the bcdtui pilot tests share (their working directory is conftest's `place` fixture): an app over it,
waiting for a condition on screen, the runs table and its real rows (launches without a directory left out),
and its cursor put on a run."""
from __future__ import annotations

import time
from pathlib import Path

from textual.widgets import DataTable

from bcdtui.app import BcdApp
from bcdtui.runner import cpu_slot


def make_app(place: Path, **kwargs) -> BcdApp:
    kwargs.setdefault("slots", [cpu_slot()])
    kwargs.setdefault("per_slot", 2)
    kwargs.setdefault("refresh_s", 0.1)
    return BcdApp(place / "runs", place / "recipes", **kwargs)


async def until(pilot, predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.1)


def shown_runs(app: BcdApp) -> list[str]:
    return [str(r.key.value) for r in app.runs_screen.query_one("#runs", DataTable).ordered_rows]


def real_runs(app: BcdApp) -> list[str]:
    return [r for r in shown_runs(app) if not r.startswith("job:")]


def table(app: BcdApp) -> DataTable:
    return app.runs_screen.query_one("#runs", DataTable)


def cursor_to(app: BcdApp, run_id: str) -> None:
    """The runs table's cursor onto this run's row."""
    t = table(app)
    t.move_cursor(row=t.get_row_index(run_id))
