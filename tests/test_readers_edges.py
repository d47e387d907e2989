"""Edge cases of total readers (issue 11): files that are directories, links, FIFOs or devices; a line longer
than the limit; a rewritten stream; runs directories that are files or cannot be listed; sweep.json of any kind;
names and strings that would drive a terminal; bad lines counted alike by every reader; the schema's messages."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from reader_checks import check_engine_readers, check_ls, check_tui_readers
from run_corpus import BAD_LINES, healthy_run

from bcdcore import runfiles
from bcdcore.cli import cmd_ls
from bcdcore.records import RecordError, parse_event, parse_status
from bcdcore.rundir import EventTail, list_runs, read_events, read_status_checked
from bcdcore.sweep import sweep_summary
from bcdtui.runs import RunsModel, row_cells
from bcdtui.tailer import RunFollower, read_tail

FILES = ("status.json", "metrics.jsonl", "recipe.toml", "log.txt", "checkpoint.pt")


@contextmanager
def no_hang(seconds: int = 20):
    """A reader that blocks (a FIFO opened for reading) fails the test instead of hanging the suite."""
    def alarm(signum, frame):
        raise AssertionError(f"a reader blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


ODD = {
    "a directory": lambda p: p.mkdir(),
    "a symlink loop": lambda p: os.symlink(p.name, p),
    "a dangling symlink": lambda p: os.symlink("nowhere", p),
    "a FIFO": lambda p: os.mkfifo(p),
    "/dev/zero": lambda p: os.symlink("/dev/zero", p),
}


@pytest.mark.parametrize("what", sorted(ODD))
@pytest.mark.parametrize("name", FILES)
def test_a_file_that_is_not_a_regular_file(tmp_path, capsys, name, what):
    runs = tmp_path / "runs"
    path = healthy_run(runs, 0)
    healthy = healthy_run(runs, 1)
    (path / name).unlink(missing_ok=True)
    ODD[what](path / name)
    with no_hang():
        check_engine_readers(runs, path)
        check_ls(runs, path, capsys)
        check_tui_readers(runs, path, healthy)
        tail = RunFollower(path)
        tail.poll()
    status, problem = read_status_checked(path)
    if name == "status.json":
        assert problem.startswith("status.json") and status == {}
    else:
        assert status["state"] == "finished" and problem == ""
    if name == "metrics.jsonl" and what in ("a directory", "a FIFO", "/dev/zero"):
        assert read_events(path).problem.startswith("metrics.jsonl")


def test_a_line_longer_than_the_limit_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(runfiles, "CHUNK_BYTES", 4096)
    good = b'{"v": 1, "kind": "metric", "round": 1, "train_loss": 0.5}\n'
    long = b'{"v": 1, "kind": "metric", "round": 2, "pad": "' + b"x" * 20_000 + b'"}\n'
    (tmp_path / "metrics.jsonl").write_bytes(good + long + good.replace(b"\"round\": 1", b"\"round\": 3"))
    events = read_events(tmp_path)
    assert [e["round"] for e in events] == [1, 3] and events.bad_lines == 1
    tail = EventTail(tmp_path)
    assert [e["round"] for e in tail.poll()] == [1, 3] and tail.bad_lines == 1


def test_a_rewritten_stream_restarts_the_tail(tmp_path):
    """A resume that drops superseded events rewrites metrics.jsonl: the tail starts again from the top and
    the follower drops what it folded (no round twice)."""
    lines = [json.dumps({"v": 1, "kind": "metric", "t": 1.0, "round": r, "train_loss": 1.0 / r}) + "\n"
             for r in range(1, 6)]
    file = tmp_path / "metrics.jsonl"
    file.write_text("".join(lines))
    follower = RunFollower(tmp_path)
    follower.poll()
    assert follower.columns["round"] == [1, 2, 3, 4, 5]
    tmp = tmp_path / "new"
    tmp.write_text("".join(lines[:2]))
    os.replace(tmp, file)
    follower.poll()
    assert follower.columns["round"] == [1, 2]


def test_a_runs_directory_that_is_a_file_or_missing(tmp_path, capsys):
    file = tmp_path / "runs"
    file.write_text("not a directory")
    assert list_runs(file) == []
    assert cmd_ls(argparse.Namespace(runs_dir=file)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().startswith("error: ") and "not a directory" in err and err.count("\n") == 1
    model = RunsModel(file)
    assert not model.refresh().any
    assert cmd_ls(argparse.Namespace(runs_dir=tmp_path / "missing")) == 0
    assert "no runs" in capsys.readouterr().out


def test_sweep_runs_are_listed_whatever_sweep_json_holds(tmp_path):
    sweep = tmp_path / "runs" / "grid-sweep-20261126-040000-abcdef"
    inside = healthy_run(sweep, 0)
    for content in (b"\xff\xfe garbage", b"[]", b""):
        (sweep / "sweep.json").write_bytes(content)
        assert list_runs(tmp_path / "runs") == [inside]
    (sweep / "sweep.json").unlink()
    (sweep / "sweep.json").mkdir()
    assert list_runs(tmp_path / "runs") == [inside]
    assert sweep_summary(sweep)["problem"] == "sweep.json is a directory"


def test_names_and_strings_from_files_are_shown_printable(tmp_path, capsys):
    """A run directory named with control characters or undecodable bytes, and strings with an ESC or markup,
    reach the terminal escaped: nothing in a run directory can drive the terminal or break a table."""
    runs = tmp_path / "runs"
    path = healthy_run(runs, 0)
    odd = path.rename(runs / os.fsdecode(b"evil\x1b[2J\xff[b]-20261126-040000-abcdef"))
    status = json.loads((odd / "status.json").read_text())
    status["recipe"], status["error"] = "[/x]\x1b]0;pwned\x07", "line\nbreak"
    (odd / "status.json").write_text(json.dumps(status))
    assert cmd_ls(argparse.Namespace(runs_dir=runs)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J\\xff[b]" in out
    model = RunsModel(runs)
    model.refresh()
    (row,) = model.rows.values()
    assert all(c.isprintable() for c in row_cells(row).values())
    assert math.isfinite(row.train_loss)


def test_bad_lines_are_skipped_and_counted_by_every_reader(tmp_path, capsys):
    runs = tmp_path / "runs"
    path = healthy_run(runs, 0)
    good = read_events(path)
    with open(path / "metrics.jsonl", "ab") as f:
        f.write(b"\n".join(BAD_LINES[:5]) + b"\n")
    with open(path / "metrics.jsonl", "rb+") as f:  # and one bad line first
        data = f.read()
        f.seek(0)
        f.write(b"garbage\n" + data)
    n = 6
    events = read_events(path)
    assert events == good and events.bad_lines == n and events.note.startswith(f"{n} bad lines skipped (event: ")
    tail = EventTail(path)
    assert tail.poll() == list(good) and tail.bad_lines == n
    follower = RunFollower(path)
    follower.poll()
    assert follower.note == events.note and follower.columns["round"] == [1, 2, 3, 4]
    assert read_tail(path).bad_lines >= 1 and read_tail(path).round == 4
    assert cmd_ls(argparse.Namespace(runs_dir=runs)) == 0
    (row,) = capsys.readouterr().out.splitlines()[1:]
    assert row.split()[1:2] + row.split()[4:5] == ["finished", "4/4"] and row.endswith(f"  {n} bad lines")


def test_a_runs_directory_that_cannot_be_listed(tmp_path, capsys, monkeypatch):
    """(The tests run as root, whom permissions do not stop: the OS error is injected.)"""
    import bcdcore.cli as cli

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cli.os, "scandir", denied)
    assert cmd_ls(argparse.Namespace(runs_dir=tmp_path)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {tmp_path}: cannot list it (permission denied)\n"
    monkeypatch.undo()
    monkeypatch.setattr(Path, "iterdir", lambda self: denied(self))
    assert list_runs(tmp_path) == []




@pytest.mark.parametrize("raw, message", [
    (b'{"state": "running", "progress": {"round": "7"}}',
     "status.json: progress.round must be an integer >= 0, got '7'"),
    (b'{"state": "done"}', "status.json: state must be one of queued, running, finished, failed, killed, got 'done'"),
    (b'{"state": "running", "pid": 0}', "status.json: pid must be an integer in [1, 2147483647], got 0"),
    (b'{"state": "running", "started": 1e300}',
     "status.json: started must be a number in [0, 253402300799], got 1e+300"),
    (b'{"progress": {}}', "status.json: state is missing"),
    (b'[]', "status.json: not a JSON object (a list)"),
    (b'{"state": "running"', "status.json: not valid JSON (Expecting ',' delimiter: line 1 column 20 (char 19))"),
    (b'\xff', "status.json: not UTF-8 (bad byte at offset 0)"),
    (b'{"a": ' + b"[" * 100_000, "status.json: JSON nested too deeply"),
])
def test_the_schema_names_the_field_in_one_line(raw, message):
    with pytest.raises(RecordError) as caught:
        parse_status(raw)
    assert str(caught.value) == message


@pytest.mark.parametrize("line, expected", [
    (b'{"v": 1, "kind": "metric", "round": 3, "train_loss": "nan", "val_acc": "-inf", "samples": 64}',
     {"round": 3, "samples": 64}),
    (b'{"v": 1, "kind": "block", "round": 1, "block": 0, "residual": "inf", "stopped_early": false}',
     {"block": 0, "stopped_early": False}),
    (b'{"v": 1, "kind": "measure", "round": 2, "unit": "pkg.mod:unit", "value": [[1, null], [2]]}',
     {"value": [[1, None], [2]]}),
    (b'{"v": 1, "kind": "newer_kind", "t": 1.5, "anything": {"x": [1]}}', {"anything": {"x": [1]}}),
])
def test_valid_events_read_typed(line, expected):
    event = parse_event(line)
    assert {k: event[k] for k in expected} == expected
    for key in ("train_loss", "val_acc", "residual"):
        if key in event:
            assert isinstance(event[key], float) and math.isnan(event[key]) or math.isinf(event[key])


@pytest.mark.parametrize("line, message", [
    (b'{"v": 1, "kind": "metric", "round": -1}', "metric event: round must be an integer >= 0, got -1"),
    (b'{"v": 1, "kind": "metric", "round": 1, "train_loss": {}}',
     "metric event: train_loss must be a number, got an object"),
    (b'{"v": 1, "kind": "metric", "round": 1, "samples": "nan"}',
     "metric event: samples must be a number, got 'nan'"),
    (b'{"v": 1, "kind": "metric", "round": 1, "grad_evals": 1e400}',
     "metric event: grad_evals must be a finite number, got inf"),
    (b'{"v": 1, "kind": "measure", "round": 1, "unit": "[/x]"}',
     "measure event: unit must be a plain name (letters, digits, _ . : / + -), got '[/x]'"),
    (b'{"v": 2, "kind": "metric"}', "metric event: v has version 2; this reader reads version 1"),
    (b'{"v": 1, "kind": "metric", "round": 1, "x": ' + b"[" * 20 + b"]" * 20 + b"}",
     "metric event: x nested deeper than 16 levels"),
])
def test_bad_events_are_named_in_one_line(line, message):
    with pytest.raises(RecordError) as caught:
        parse_event(line)
    assert str(caught.value) == message
