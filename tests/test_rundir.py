"""The run directory writer and its readers (no torch): torn lines, tailing, metric tables, atomic status,
run ids, exclusive directories."""
from __future__ import annotations

import csv
import errno
import json
import math
import os
import re
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from bcdcore import rundir as rd
from bcdcore.rundir import (
    EventTail,
    RunDir,
    effective_state,
    list_runs,
    metric_table,
    read_events,
    read_status,
    run_id_for,
    write_json_atomic,
)

DIGEST = "0123456789abcdef" * 4
RUN_ID = re.compile(r"(?P<name>.+)-(?P<date>\d{8})-(?P<time>\d{6})-(?P<hex>[0-9a-f]{6})")


def line(kind: str, **fields) -> str:
    return json.dumps({"v": 1, "kind": kind, "t": 1.0, **fields}) + "\n"


# ----------------------------------------------------------------------------------------------------------
# readers

def test_reader_skips_a_torn_last_line(tmp_path):
    whole = line("start", run_id="x") + line("metric", round=1, train_loss=0.5)
    (tmp_path / "metrics.jsonl").write_text(whole + '{"v": 1, "kind": "metric", "round": 2, "train_lo')
    events = read_events(tmp_path)
    assert [e["kind"] for e in events] == ["start", "metric"]
    assert [e["round"] for e in read_events(tmp_path, "metric")] == [1]
    assert metric_table(events)["train_loss"] == [0.5]


def test_reader_of_a_missing_stream_is_empty(tmp_path):
    assert read_events(tmp_path) == []
    assert read_status(tmp_path) == {}
    assert EventTail(tmp_path).poll() == []


def test_event_tail_returns_only_new_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(line("start", run_id="x"))
    tail = EventTail(tmp_path)
    assert [e["kind"] for e in tail.poll()] == ["start"]
    assert tail.poll() == []  # nothing new
    with open(path, "a") as f:
        f.write(line("metric", round=1))
        f.write('{"v": 1, "kind": "metric", "rou')  # the writer is in the middle of a line
    assert [e["round"] for e in tail.poll()] == [1]
    assert tail.poll() == []  # the partial line is not consumed...
    with open(path, "a") as f:
        f.write('nd": 2}\n')
    assert [e["round"] for e in tail.poll()] == [2]  # ...and is read whole once completed
    with open(path, "a") as f:
        f.write(line("metric", round=3) + line("end", state="finished", reason="rounds done"))
    assert [e["kind"] for e in tail.poll()] == ["metric", "end"]
    assert tail.poll() == []
    # a second tail started later reads everything from the beginning
    assert [e.get("round") for e in EventTail(tmp_path).poll()] == [None, 1, 2, 3, None]


def test_event_tail_does_not_split_multibyte_characters(tmp_path):
    path = tmp_path / "metrics.jsonl"
    record = {"v": 1, "kind": "end", "t": 1.0, "state": "failed", "reason": "diverged: loss \u2192 \u221e"}
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    cut = data.index("\u221e".encode()) + 1  # inside the 3-byte character
    path.write_bytes(data[:cut])
    tail = EventTail(tmp_path)
    assert tail.poll() == []
    with open(path, "ab") as f:
        f.write(data[cut:])
    assert tail.poll()[0]["reason"] == "diverged: loss \u2192 \u221e"


def test_metric_table_keeps_the_last_event_of_a_repeated_round():
    events = [
        {"kind": "start"},
        {"kind": "metric", "round": 1, "train_loss": 1.0, "grad_evals": 4},
        {"kind": "metric", "round": 2, "train_loss": 0.9, "grad_evals": 8, "val_loss": 0.95},
        {"kind": "block", "round": 3, "block": 0},
        {"kind": "metric", "round": 3, "train_loss": 0.8, "grad_evals": 12},
        # a resume from the checkpoint of round 1 repeats rounds 2 and 3
        {"kind": "metric", "round": 2, "train_loss": 0.7, "grad_evals": 8},
        {"kind": "metric", "round": 3, "train_loss": 0.6, "grad_evals": 12, "val_loss": "nan"},
        {"kind": "metric", "round": 4, "train_loss": "inf", "grad_evals": 16},
    ]
    table = metric_table(events)
    assert table["round"] == [1, 2, 3, 4]
    assert table["train_loss"][:3] == [1.0, 0.7, 0.6]
    assert math.isinf(table["train_loss"][3])
    assert table["grad_evals"] == [4, 8, 12, 16]
    # the repeated round 2 has no val_loss: the earlier value does not leak in
    assert all(math.isnan(v) for v in table["val_loss"])
    assert "test_acc" not in table


# ----------------------------------------------------------------------------------------------------------
# the writer

@pytest.fixture
def run(tmp_path):
    r = RunDir.create(tmp_path / "runs", "demo", DIGEST, "[run]\nname = \"demo\"\n")
    yield r
    r.close()


def test_run_id_format():
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp()
    assert run_id_for("quick", DIGEST, when) == "quick-20240102-030405-012345"
    assert run_id_for("a.b_c-d", "ffeedd00", when) == "a.b_c-d-20240102-030405-ffeedd"


def test_created_run_id_follows_the_pattern_in_utc(run):
    before = datetime.now(timezone.utc)
    m = RUN_ID.fullmatch(run.run_id)
    assert m, run.run_id
    assert m["name"] == "demo" and m["hex"] == DIGEST[:6]
    stamp = datetime.strptime(m["date"] + m["time"], "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
    assert abs((stamp - before).total_seconds()) < 60
    assert run.path.name == run.run_id
    assert (run.path / "recipe.toml").read_text() == "[run]\nname = \"demo\"\n"
    status = read_status(run.path)
    assert status["state"] == "queued" and status["run_id"] == run.run_id


def test_two_runs_of_one_recipe_never_share_a_directory(tmp_path):
    runs = [RunDir.create(tmp_path / "runs", "demo", DIGEST, f"# {i}\n") for i in range(3)]
    try:
        paths = {r.path for r in runs}
        assert len(paths) == 3
        for i, r in enumerate(runs):
            assert (r.path / "recipe.toml").read_text() == f"# {i}\n"  # nobody overwrote it
        assert list_runs(tmp_path / "runs") == sorted(paths)
    finally:
        for r in runs:
            r.close()


def test_status_is_merged_and_written_atomically(run, monkeypatch):
    run.write_status(state="running", pid=os.getpid(), progress={"round": 1, "rounds": 5})
    run.write_status(progress={"round": 2, "rounds": 5})
    status = read_status(run.path)
    assert status["state"] == "running" and status["pid"] == os.getpid()
    assert status["progress"] == {"round": 2, "rounds": 5}
    assert status["run_id"] == run.run_id and "host" in status
    leftovers = [p.name for p in run.path.iterdir() if "tmp" in p.name]
    assert leftovers == []

    # a writer that fails half-way leaves the previous status.json whole and no temporary file
    def broken_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(rd.os, "replace", broken_replace)
    with pytest.raises(OSError):
        run.write_status(state="finished")
    monkeypatch.undo()
    assert read_status(run.path)["state"] == "running"
    assert [p.name for p in run.path.iterdir() if "tmp" in p.name] == []


def test_status_still_written_when_the_disk_is_full(run, monkeypatch):
    """A full disk refuses the temporary file; the status is then rewritten in place (its blocks exist)."""
    run.write_status(state="running", pid=os.getpid())

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rd.os, "replace", full)
    run.write_status(state="failed", error="no space left on device")
    monkeypatch.undo()
    status = read_status(run.path)
    assert status["state"] == "failed" and status["error"] == "no space left on device"
    assert [p.name for p in run.path.iterdir() if "tmp" in p.name] == []


def test_write_json_atomic_writes_non_finite_numbers_as_strings(tmp_path):
    path = tmp_path / "s.json"
    write_json_atomic(path, {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})
    text = path.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data == {"a": "nan", "b": ["inf", 1.5], "c": {"d": "-inf"}}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_events_are_versioned_flushed_per_line_and_valid_json(run):
    before = time.time()
    run.event("start", run_id=run.run_id, n_blocks=2)
    run.event("metric", round=1, grad_evals=4, samples=128, wall_s=0.1, train_loss=math.nan, val_acc=0.5)
    # flushed per line: another reader sees both lines before the writer closes
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    events = [json.loads(x, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) for x in lines]
    for e in events:
        assert e["v"] == 1 and before <= e["t"] <= time.time()
    assert events[0]["kind"] == "start" and events[1]["kind"] == "metric"
    assert events[1]["train_loss"] == "nan"
    assert math.isnan(metric_table(read_events(run.path))["train_loss"][0])


def test_metrics_csv_and_arrays(run):
    run.event("metric", round=1, grad_evals=4, samples=128, wall_s=0.1, train_loss=1.0)
    run.event("block", round=2, block=0)
    run.event("metric", round=2, grad_evals=8, samples=256, wall_s=0.2, train_loss=0.5, val_loss=0.6,
              val_acc=0.8)
    run.write_arrays()
    with open(run.path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["1", "2"]  # block events are not metric rows
    assert rows[0]["val_loss"] == "" and float(rows[1]["val_acc"]) == 0.8
    np.testing.assert_array_equal(np.load(run.path / "arrays" / "train_loss.npy"), [1.0, 0.5])
    val = np.load(run.path / "arrays" / "val_loss.npy")
    assert math.isnan(val[0]) and val[1] == 0.6


def test_reopened_run_appends(tmp_path):
    first = RunDir.create(tmp_path / "runs", "demo", DIGEST, "")
    first.event("metric", round=1, train_loss=1.0)
    first.close()
    again = RunDir.open(first.path)
    again.event("metric", round=2, train_loss=0.5)
    again.close()
    assert again.run_id == first.run_id
    assert [e["round"] for e in read_events(first.path, "metric")] == [1, 2]
    with open(first.path / "metrics.csv", newline="") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["1", "2"]  # one header only


def test_effective_state_marks_dead_running_runs_lost(run):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    assert effective_state({"state": "running", "pid": int(dead), "host": socket.gethostname()}) == "lost"
    assert effective_state({"state": "running", "pid": os.getpid(), "host": socket.gethostname()}) == "running"
    assert effective_state({"state": "running", "pid": int(dead), "host": "elsewhere"}) == "running"
    assert effective_state({"state": "finished", "pid": int(dead)}) == "finished"
