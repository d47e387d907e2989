"""The one rule for a run's displayed state (bcdcore.rundir.run_state) over status, pid and the writer lock,
and the lock as readers show it: `bcdcore ls`, the runs model and the run screen's status line."""
from __future__ import annotations

import json
import os
import socket

import pytest

from bcdcore.rundir import RunLock, read_status_checked, run_state
from bcdtui.app import BcdApp
from bcdtui.runner import Runner, RunnerError, Slot
from bcdtui.runs import RunsModel
from bcdtui.screens import RunScreen
from bcdtui.synthetic import DEAD_PID, write_run

HOST = socket.gethostname()
ME = f"{HOST}:{os.getpid()}"


def make(tmp_path, state: str, pid: int | None = DEAD_PID, host: str = HOST, run_id: str = "r-20261126-040000-abcdef"):
    path = write_run(tmp_path / "runs", run_id, state=state, rounds=4, pid=pid, host=host)
    if pid is None:  # write_run fills a dead pid in: take it out again
        status = json.loads((path / "status.json").read_text())
        status.pop("pid")
        (path / "status.json").write_text(json.dumps(status))
    return path


@pytest.fixture
def lock():
    held = []
    yield lambda path: held.append(RunLock(path).acquire())
    for item in held:
        item.release()


def shown(path):
    status, problem = read_status_checked(path)
    return run_state(status, path, problem)


def test_a_running_run_whose_process_is_gone_and_holds_no_lock_is_lost(tmp_path):
    state = shown(make(tmp_path, "running"))
    assert state.state == "lost" and state.holder is None
    assert f"{HOST}:{DEAD_PID}" in state.reason and "lock" in state.reason


def test_the_lock_holder_keeps_a_run_running_and_is_shown(tmp_path, lock):
    path = make(tmp_path, "running")  # the pid in the status is dead, but a process holds the lock
    lock(path)
    state = shown(path)
    assert (state.state, state.holder) == ("running", ME)


def test_queued_runs(tmp_path):
    assert shown(make(tmp_path, "queued", pid=None)).state == "queued"  # not started: no process to miss
    assert shown(make(tmp_path, "queued", run_id="q-20261126-040000-abcdef")).state == "lost"  # its starter died


def test_another_hosts_run_is_not_judged_by_this_hosts_pids(tmp_path):
    assert shown(make(tmp_path, "running", host="elsewhere")).state == "running"


def test_an_ended_run_keeps_its_state_and_an_unreadable_one_shows_its_holder(tmp_path, lock):
    path = make(tmp_path, "killed")
    lock(path)  # e.g. a resume that took the lock and has not yet written "running"
    assert shown(path).state == "killed"
    (path / "status.json").write_bytes(b"\xff")
    state = shown(path)
    assert (state.state, state.holder, state.label) == ("unreadable", ME,
                                                         "unreadable: status.json: not UTF-8 (bad byte at offset 0)")


def test_the_runs_model_and_the_runner_see_the_lock(tmp_path, lock):
    path = make(tmp_path, "running")
    model = RunsModel(tmp_path / "runs")
    model.refresh()
    assert model.rows[path.name].state == "lost" and model.rows[path.name].holder == ""
    lock(path)
    assert path.name in model.refresh().changed
    row = model.rows[path.name]
    assert (row.state, row.holder) == ("running", ME)
    runner = Runner(tmp_path / "runs", slots=[Slot("cpu", "CPU", "")], restore_queue=False)
    for action in (runner.resume, runner.delete):
        with pytest.raises(RunnerError, match=f"being written by {ME}"):
            action(path)
    assert path.is_dir()


async def test_the_run_screen_names_the_writer_holding_the_lock(tmp_path, lock, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = make(tmp_path, "running")
    lock(path)
    app = BcdApp(tmp_path / "runs", tmp_path / "recipes", slots=[Slot("cpu", "CPU", "")], refresh_s=0.25)
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.pause()
        await pilot.press("enter")
        for _ in range(100):  # a loaded machine may take a few frames to open the screen
            if isinstance(app.screen, RunScreen) and app.screen.query_one("#summary").text_lines:
                break
            await pilot.pause(0.05)
        text = " ".join(line.plain for line in app.screen.query_one("#summary").text_lines)
        assert f"writer {ME} (holds the lock)" in text, text
        assert text.startswith("running")


def test_ls_json_gives_the_state_the_reason_and_the_lock_holder(tmp_path, lock, capsys):
    import argparse

    from bcdcore.cli import cmd_ls

    held = make(tmp_path, "running")
    lock(held)
    lost = make(tmp_path, "running", run_id="l-20261126-040000-abcdef")
    broken = make(tmp_path, "finished", run_id="b-20261126-040000-abcdef")
    (broken / "status.json").write_text("[]")
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"v": 1, "kind": "metric", "round": 9, "train_loss": "nan"}\n')
    assert cmd_ls(argparse.Namespace(runs_dir=tmp_path / "runs", json=True)) == 0
    records = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert (records[held.name]["state"], records[held.name]["holder"]) == ("running", ME)
    assert records[lost.name]["state"] == "lost" and "no writer lock" in records[lost.name]["reason"]
    assert records[broken.name]["state"] == "unreadable"
    assert records[broken.name]["reason"] == "status.json: not a JSON object (a list)"
    assert (records[broken.name]["round"], records[broken.name]["train_loss"]) == (9, "nan")


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink loop", "garbage holder"])
def test_an_odd_lock_file_never_blocks_or_leaks_to_the_terminal(tmp_path, kind):
    path = make(tmp_path, "running", pid=os.getpid())
    lock_file = path / "lock"
    if kind == "fifo":
        os.mkfifo(lock_file)  # opening it to probe would block forever
    elif kind == "directory":
        lock_file.mkdir()
    elif kind == "symlink loop":
        os.symlink("lock", lock_file)
    else:
        held = RunLock(path).acquire()
        os.pwrite(held._fd, b"\x1b]0;pwned\x07" + b"x" * 500, 0)
    state = shown(path)
    if kind == "garbage holder":
        held.release()
        assert state.holder.startswith("\\x1b]0;pwned\\x07") and len(state.holder) <= 120
    else:
        assert (state.state, state.holder) == ("running", None)  # our own pid: alive


def test_a_lost_run_says_what_its_last_end_event_says(tmp_path, capsys):
    """A full disk can refuse the final status.json after the end event went out: readers show the run lost,
    with the end the writer recorded."""
    import argparse

    from bcdcore.cli import cmd_ls

    path = make(tmp_path, "running")
    with open(path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"v": 1, "kind": "end", "t": 2.0, "state": "failed",
                            "reason": "no space left on device"}) + "\n")
    assert cmd_ls(argparse.Namespace(runs_dir=tmp_path / "runs", json=True)) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["state"] == "lost"
    assert record["reason"].endswith("; its last event says failed: no space left on device")
    model = RunsModel(tmp_path / "runs")
    model.refresh()
    assert model.rows[path.name].error == record["reason"]
    # resumed since (a start event after that end), then killed -9: the old end says nothing of this segment
    with open(path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"v": 1, "kind": "start", "t": 3.0, "resumed_from_round": 2}) + "\n")
    assert cmd_ls(argparse.Namespace(runs_dir=tmp_path / "runs", json=True)) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["state"] == "lost" and "last event" not in record["reason"]
    model.refresh()
    assert model.rows[path.name].error == record["reason"]
