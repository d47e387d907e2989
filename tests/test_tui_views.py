"""What the screens show, computed without a terminal (bcdtui.views): run summary, block rows, launch preview."""
from __future__ import annotations

import json
from pathlib import Path

from bcdtui.recipes import LaunchPlan
from bcdtui.synthetic import write_run
from bcdtui.tailer import RunFollower
from bcdtui.views import block_cells, launch_preview, run_summary, short, styled_state


def test_run_summary_of_a_finished_and_a_failed_run(tmp_path):
    follower = RunFollower(write_run(tmp_path, "r-20260101-000000-aaaaaa", state="finished", rounds=10))
    follower.poll()
    lines = [line.plain for line in run_summary(None, follower)]
    assert lines[0].startswith("finished  round 10/10") and "train_loss" in lines[1]
    assert lines[2].startswith("ended finished")
    failed = RunFollower(write_run(tmp_path, "r-20260101-000000-bbbbbb", state="failed", rounds=10, done=3))
    failed.poll()
    assert [line.plain for line in run_summary(None, failed)][0].startswith("failed")


def test_run_summary_shows_the_later_of_status_progress_and_the_events(tmp_path):
    """A running run rewrites status.json's progress at most 4 times a second: the metric events it has
    written since are the newer word on the round."""
    run = write_run(tmp_path, "r-20260101-000000-cccccc", state="running", rounds=10, done=6)
    status = json.loads((run / "status.json").read_text())
    status["progress"]["round"] = 4
    (run / "status.json").write_text(json.dumps(status))
    follower = RunFollower(run)
    follower.poll()
    assert [line.plain for line in run_summary(None, follower)][0].startswith("running  round 6/10")
    status["progress"]["round"] = 8  # and status.json when it is ahead of the events read so far
    (run / "status.json").write_text(json.dumps(status))
    follower.refresh_status()
    assert [line.plain for line in run_summary(None, follower)][0].startswith("running  round 8/10")


def test_block_cells_mark_the_certified_blocks():
    cells = block_cells({"block": 1, "inner_steps": 4, "stopped_early": True, "residual": 0.1, "threshold": 0.2,
                         "lambda": 0.01, "gamma": 1.0, "dist": 0.5})
    assert cells[0] == "1" and cells[1].plain == "4↓" and cells[2].style == "#81c784"  # stopped early, met
    assert block_cells({"threshold": None})[3] == "off" and len(cells) == 7  # lambda, gamma, dist follow


def test_launch_preview_counts_what_starts_and_what_waits():
    plan = LaunchPlan(Path("g.toml"), [["run.seed=0"], ["run.seed=1"], ["run.seed=2"]], "g", "sweep of 3 runs",
                      [{"run.seed": 0}, {"run.seed": 1}, {"run.seed": 2}])
    lines = [line.plain for line in launch_preview(plan, {"gpu0": 1, "gpu1": 0}, ["gpu0", "gpu1"], 2)]
    assert lines[0] == "✓ sweep of 3 runs"
    assert lines[1] == "3 runs: 3 start now, 0 wait in the queue (slots gpu0, gpu1, 2 per slot)"
    assert lines[2:] == ["  run.seed=0", "  run.seed=1", "  run.seed=2"]
    one = launch_preview(plan, {"gpu0": 2}, ["gpu0"], 2)[1].plain
    assert one.startswith("3 runs: 0 start now, 3 wait in the queue")


def test_state_styles_and_short_values():
    assert styled_state("unreadable: bad bytes").style == "bold #e57373"
    assert short("x" * 300, 10) == "x" * 9 + "…" and short({"a": 1}) == '{"a": 1}'
