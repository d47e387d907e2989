"""Snapshots of the system screen (F4) at 80x24 and 160x48 with fake GPUs and fixed process numbers, so the
picture does not depend on this machine. `--snapshot-update` after an intended change."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from test_tui_system import fake_monitor

from bcdtui.app import BcdApp
from bcdtui.runner import Slot
from bcdtui.screens.system import SystemScreen
from bcdtui.synthetic import demo_runs, write_run

pytest.importorskip("pytest_textual_snapshot")


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo_runs(tmp_path / "runs")
    write_run(tmp_path / "runs", "live-20261126-050000-abcdef", state="running", pid=os.getpid(),
              host=socket.gethostname(), rounds=100, done=10, started=1_795_009_000.0)
    (tmp_path / "recipes").mkdir()
    app = BcdApp(Path("runs"), Path("recipes"), slots=[Slot("cpu", "CPU", "")], refresh_s=0.25)
    app.system_monitor = fake_monitor()[0]
    return app


async def _open(pilot) -> None:
    await pilot.pause()
    await pilot.press("f4")
    deadline = time.monotonic() + 30
    while not (isinstance(pilot.app.screen, SystemScreen) and pilot.app.screen.snapshot is not None):
        assert time.monotonic() < deadline, "no sample reached the system screen"
        await pilot.pause(0.05)
    await pilot.pause()


@pytest.mark.parametrize("size", [pytest.param((80, 24), id="80x24"), pytest.param((160, 48), id="160x48")])
def test_system_screen(snap_compare, app, size):
    assert snap_compare(app, terminal_size=size, run_before=_open)
