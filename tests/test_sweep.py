"""bcdcore sweep: the grid runs with at most the slot count at once, and SIGINT stops it cleanly."""
from __future__ import annotations

import json
import signal
import time

from conftest import run_cli, start_cli, tiny_recipe

from bcdcore.rundir import list_runs, pid_alive, read_events, read_status

GRID = """
[sweep]
"algorithm.K" = [1, 2]
"run.seed" = [0, 1, 2]
"""


def overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals alive at one instant."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    alive = peak = 0
    for _, step in edges:
        alive += step
        peak = max(peak, alive)
    return peak


def test_sweep_runs_every_point_within_the_slot_limit(tmp_path):
    (tmp_path / "grid.toml").write_text(tiny_recipe(append=GRID))
    proc = run_cli("sweep", "grid.toml", "--per-gpu", "2", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sweep_dirs = [p for p in (tmp_path / "runs").iterdir() if (p / "sweep.json").is_file()]
    assert len(sweep_dirs) == 1
    sweep = json.loads((sweep_dirs[0] / "sweep.json").read_text())
    assert len(sweep["points"]) == 6 and len(sweep["slots"]) == 2
    assert {(p["overrides"]["algorithm.K"], p["overrides"]["run.seed"]) for p in sweep["points"]} == \
        {(k, s) for k in (1, 2) for s in (0, 1, 2)}
    runs = list_runs(tmp_path / "runs")
    assert len(runs) == 6 and all(r.parent == sweep_dirs[0] for r in runs)
    statuses = [read_status(r) for r in runs]
    assert all(s["state"] == "finished" for s in statuses)
    assert overlap([(s["started"], s["ended"]) for s in statuses]) <= 2
    assert overlap([(p["started"], p["ended"]) for p in sweep["points"]]) == 2  # slots were used in parallel
    # each run is the concrete point: its resolved recipe has no [sweep] table and the point's values
    for point in sweep["points"]:
        text = (tmp_path / point["run_dir"] / "recipe.toml").read_text()
        assert "[sweep]" not in text
        assert f"K = {point['overrides']['algorithm.K']}\n" in text


def test_sigint_stops_the_queue_and_terminates_children(tmp_path):
    long = tiny_recipe(replace={"rounds = 3": "rounds = 100000"}, append=GRID)
    (tmp_path / "grid.toml").write_text(long)
    proc = start_cli("sweep", "grid.toml", "--per-gpu", "2", cwd=tmp_path)
    deadline = time.monotonic() + 120
    running = []
    while time.monotonic() < deadline:
        running = [r for r in list_runs(tmp_path / "runs") if read_events(r, "metric")]
        if len(running) == 2:
            break
        time.sleep(0.2)
    assert len(running) == 2, "two runs should be training side by side"
    pids = [read_status(r)["pid"] for r in running]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "stopped" in out
    for run in running:
        assert read_status(run)["state"] == "killed"
        assert (run / "checkpoint.pt").is_file()
    assert not any(pid_alive(pid) for pid in pids)
    sweep_dir = running[0].parent
    points = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    assert sum(p["state"] == "not started" for p in points) == 4
    assert len(list_runs(tmp_path / "runs")) == 2  # nothing else was started after the signal


def test_sweep_needs_a_grid(tmp_path):
    (tmp_path / "plain.toml").write_text(tiny_recipe())
    proc = run_cli("sweep", "plain.toml", cwd=tmp_path)
    assert proc.returncode == 2 and "no [sweep] table" in proc.stderr
    assert not (tmp_path / "runs").exists()
