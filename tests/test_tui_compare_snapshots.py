"""Snapshots of the compare screen at 80x24 and 160x48 (pytest-textual-snapshot): smoothing on, and the grid
of metrics. `pytest tests/test_tui_compare_snapshots.py --snapshot-update` after an intended change."""
from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import DataTable

from bcdtui.app import BcdApp
from bcdtui.runner import Slot
from bcdtui.synthetic import demo_runs

pytest.importorskip("pytest_textual_snapshot")

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((160, 48), id="160x48")]
RUNS = ("quickstart-20261126-025404-92c6eb", "quickstart-20261126-031010-4be1a0")


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo_runs(tmp_path / "runs")
    (tmp_path / "recipes").mkdir()
    return BcdApp(Path("runs"), Path("recipes"), slots=[Slot("cpu", "CPU", "")], refresh_s=0.25)


def _compare_then(*keys: str):
    async def run_before(pilot) -> None:
        await pilot.pause()
        table = pilot.app.runs_screen.query_one("#runs", DataTable)
        for run_id in RUNS:
            table.move_cursor(row=table.get_row_index(run_id))
            await pilot.press("space")
        await pilot.press("c")
        await pilot.pause()
        await pilot.press(*keys)
        await pilot.pause()

    return run_before


@pytest.mark.parametrize("size", SIZES)
def test_compare_smoothed(snap_compare, app, size):
    assert snap_compare(app, terminal_size=size, run_before=_compare_then("s", "s", "s"))


@pytest.mark.parametrize("size", SIZES)
def test_compare_grid(snap_compare, app, size):
    assert snap_compare(app, terminal_size=size, run_before=_compare_then("v"))
