"""bcdtui's cluster-jobs screen (F5), driven by keys: a sweep directory whose sweep.json records a running job of
submitit's local executor (here a stand-in process whose command line names submitit) and an ended one; the
screen lists the live job, `a` shows both, `x` then `y` cancels the live one (SIGINT to its process)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from textual.widgets import DataTable

from bcdtui.app import BcdApp
from bcdtui.cluster import ClusterJobs
from bcdtui.runner import cpu_slot
from bcdtui.screens import ClusterScreen, ConfirmScreen
from bcdtui.synthetic import write_run


def _cells(table: DataTable) -> list[list[str]]:
    return [[getattr(c, "plain", str(c)) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def test_f5_lists_live_jobs_and_cancels_one(tmp_path):
    runs = tmp_path / "runs"
    sweep = runs / "grid-sweep-20261202-000000-abcdef"
    sweep.mkdir(parents=True)
    write_run(sweep, "tiny-20261202-000001-aaaaaa", state="running", rounds=10, done=3)
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "submitit"])
    try:
        (sweep / "sweep.json").write_text(json.dumps({
            "cluster": {"executor": "local"},
            "jobs": [{"job_id": str(stand_in.pid), "state": "running", "points": [0]},
                     {"job_id": "7", "state": "done", "points": [1]}],
            "points": [{"index": 0, "run_dir": str(sweep / "tiny-20261202-000001-aaaaaa")},
                       {"index": 1, "run_dir": None}]}))
        app = BcdApp(runs, tmp_path / "recipes", slots=[cpu_slot()], refresh_s=0.1)
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot.press("f5")
            await pilot.pause(0.2)
            assert isinstance(app.screen, ClusterScreen)
            table = app.screen.query_one("#jobs", DataTable)
            assert _cells(table) == [[sweep.name, str(stand_in.pid), "local", "running", "1", "1 running"]]
            await pilot.press("a")
            assert [row[3] for row in _cells(table)] == ["running", "done"]
            await pilot.press("a")
            await pilot.press("x")
            await pilot.pause(0.1)
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await pilot.pause(0.2)
            assert stand_in.wait(timeout=10) != 0  # SIGINT ended it
            assert isinstance(app.screen, ClusterScreen)
        # the runs table lists the run inside the sweep directory
        model = app.ws.model
        assert "tiny-20261202-000001-aaaaaa" in model.rows
    finally:
        if stand_in.poll() is None:
            stand_in.kill()
    # a pid that is no submitit process is left alone
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (sweep / "sweep.json").write_text(json.dumps({"cluster": {"executor": "local"},
                                                      "jobs": [{"job_id": str(other.pid), "state": "queued"}]}))
        (row,) = ClusterJobs(runs).refresh(live_only=True)
        assert row.runs == "not started"
        assert "no longer a submitit job" in ClusterJobs(runs).cancel(row)
        # a live job whose `bcdcore sweep --slurm` has gone: shown, with a warning that its state may be stale
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        (sweep / "sweep.json").write_text(json.dumps({
            "watcher": {"host": socket.gethostname(), "pid": gone.pid}, "cluster": {"executor": "slurm"},
            "jobs": [{"job_id": "123_4", "state": "queued"}]}))
        jobs = ClusterJobs(runs)
        assert [r.job.job_id for r in jobs.refresh(live_only=True)] == ["123_4"]
        assert jobs.problems == [f"{sweep.name}: its `bcdcore sweep --slurm` has ended; job states may be stale"]
        time.sleep(0.2)
        assert other.poll() is None
    finally:
        other.kill()
