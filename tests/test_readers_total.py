"""Every reader of run directories is total (issue 11): random and mutated status.json, metrics.jsonl,
recipe.toml, log.txt and checkpoint.pt bytes (hypothesis), and files that are directories, links, FIFOs or
devices, go to every reader: the schema (bcdcore.records), rundir's readers, `bcdcore ls` (in process), `plot`,
the sweep summary, and bcdtui's runs model, run follower, table tail, recipe diff, comparison and validator.
None may raise; a run whose status cannot be read shows `unreadable: <reason>` (one printable line); every
event a reader returns follows the schema; a bad line is counted."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bcdcore import runfiles
from bcdcore.cli import cmd_ls
from bcdcore.records import STATES, check_event, check_status
from bcdcore.rundir import (EventTail, list_runs, metric_table, read_events, read_recipe_dict, read_status,
                            read_status_checked, run_state)
from bcdcore.sweep import sweep_summary
from bcdtui.charts import Series, as_matrix, heat_map, line_chart, sparkline
from bcdtui.diff import diff_runs
from bcdtui.recipes import validate_text
from bcdtui.runner import Runner, RunnerError, cpu_slot
from bcdtui.runs import STATE_ORDER, RunsModel, row_cells
from bcdtui.tailer import RunFollower, read_tail
from bcdtui.workstation import Workstation
from run_corpus import BAD_LINES, healthy_run

SEED_DIR = Path(tempfile.mkdtemp(prefix="bcd-seed-"))
SEED = healthy_run(SEED_DIR, 0, rounds=3)  # a finished run: the bytes that mutations start from
SEED_STATUS = (SEED / "status.json").read_bytes()
SEED_LINES = (SEED / "metrics.jsonl").read_bytes().splitlines()
SEED_RECIPE = (SEED / "recipe.toml").read_bytes()
FILES = ("status.json", "metrics.jsonl", "recipe.toml", "log.txt", "checkpoint.pt")

# ----------------------------------------------------------------------------------------------------------
# strategies

EXTREMES = [1e308, -1e308, 1.7976931348623157e308, 5e-324, -0.0, 1e20, 2 ** 63 - 1, 2 ** 63, -2 ** 63,
            253402300800.0, 2 ** 31, 0, -1]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(EXTREMES) | st.text(max_size=12)
    | st.sampled_from(["nan", "inf", "-inf", "[/x]", "\x1b[31m", "\x00", "\ud800", "finished", "running"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` with a few byte-level edits: flips, insertions, deletions, truncation, duplication."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        i = draw(st.integers(0, len(data)))
        if op == "flip" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[i:]
        elif op == "duplicate":
            data[i:i] = data[max(0, i - 20):i]
    return bytes(data)


@st.composite
def with_field(draw, seed: bytes) -> bytes:
    """A JSON object of `seed` with one field (maybe nested, maybe new) set to any JSON value."""
    obj = json.loads(seed)
    where = obj
    keys = list(obj) + ["progress.round", "progress.rounds", "extra"]
    key = draw(st.sampled_from(keys))
    if "." in key and isinstance(obj.get("progress"), dict):
        where, key = obj["progress"], key.split(".")[1]
    where[key] = draw(json_values)
    return json.dumps(obj).encode("utf-8", errors="surrogatepass")


status_bytes = st.one_of(st.binary(max_size=200), mutated(SEED_STATUS), with_field(SEED_STATUS),
                         st.just(SEED_STATUS))
event_line = st.one_of(st.sampled_from(SEED_LINES), st.sampled_from(SEED_LINES).flatmap(mutated),
                       st.sampled_from(SEED_LINES).flatmap(with_field), st.sampled_from(BAD_LINES),
                       st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")))
metrics_bytes = st.builds(lambda lines, end: b"\n".join(lines) + end, st.lists(event_line, max_size=12),
                          st.sampled_from([b"\n", b""]))
recipe_bytes = st.one_of(st.just(SEED_RECIPE), mutated(SEED_RECIPE), st.binary(max_size=200),
                         st.text(max_size=200).map(lambda t: t.encode("utf-8", errors="surrogatepass")),
                         st.integers(1, 5000).map(lambda n: b"a = " + b"[" * n + b"]" * n),
                         st.integers(1, 2000).map(lambda n: b"[" + b".".join([b"k"] * n) + b"]\nx = 1"))
run_files = st.fixed_dictionaries({
    "status.json": status_bytes, "metrics.jsonl": metrics_bytes, "recipe.toml": recipe_bytes,
    "log.txt": st.binary(max_size=100), "checkpoint.pt": st.binary(max_size=100)})

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])


@contextmanager
def run_dir(files: dict[str, bytes]):
    """A runs directory holding one run with these files, and a healthy run beside it."""
    with tempfile.TemporaryDirectory(prefix="bcd-total-") as tmp:
        runs = Path(tmp) / "runs"
        path = runs / "bad-20261126-040000-abcdef"
        path.mkdir(parents=True)
        for name, data in files.items():
            (path / name).write_bytes(data)
        yield runs, path, healthy_run(runs, 1, rounds=3)


def one_line(text: str) -> bool:
    return bool(text) and text.isprintable() and len(text) < 400


# ----------------------------------------------------------------------------------------------------------
# the schema

@given(json_values)
@settings(max_examples=300, deadline=None)
def test_schema_is_total_and_idempotent(value):
    """Any JSON value: check_status/check_event return a typed record or raise RecordError (a ValueError) with
    one printable line; a record they return passes again unchanged."""
    for check in (check_status, check_event):
        try:
            record = check(value)
        except ValueError as exc:
            assert one_line(str(exc)), str(exc)
            continue
        again = check(record)
        assert json.dumps(again, sort_keys=True, default=str) == json.dumps(record, sort_keys=True, default=str)


# ----------------------------------------------------------------------------------------------------------
# every reader over one run of random files

def check_engine_readers(runs: Path, path: Path) -> None:
    status, problem = read_status_checked(path)
    if problem:
        assert status == {} and one_line(problem), problem
    else:
        assert status["state"] in STATES and check_status(status) == status
    assert read_status(path) == status
    shown = run_state(status, path, problem)
    assert shown.state in (*STATES, "lost", "unreadable") and (shown.state == "unreadable") == bool(problem)

    events = read_events(path)
    file = path / "metrics.jsonl"
    if file.is_file() and not file.is_symlink():  # (never read a FIFO or /dev/zero here)
        assert len(events) + events.bad_lines <= len(file.read_bytes().split(b"\n"))
    for event in events:
        assert check_event(event)["kind"] == event["kind"]
    table = metric_table(events)
    assert len({len(column) for column in table.values()}) <= 1
    assert all(isinstance(v, float) for column in table.values() for v in column)
    recipe, recipe_problem = read_recipe_dict(path)
    assert isinstance(recipe, dict) and (recipe_problem == "" or one_line(recipe_problem))
    assert path in list_runs(runs)


def check_ls(runs: Path, path: Path, capsys) -> None:
    capsys.readouterr()
    assert cmd_ls(argparse.Namespace(runs_dir=runs)) == 0
    out, err = capsys.readouterr()
    assert err == ""
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()[1:]}
    assert len(rows) == 2 and all(len(r) == 6 for r in rows.values())
    status, problem = read_status_checked(path)
    assert rows[path.name][1].startswith("unreadable: ") == bool(problem)
    assert out.isprintable() or all(line.isprintable() for line in out.replace("\t", " ").splitlines())


def check_tui_readers(runs: Path, path: Path, healthy: Path) -> None:
    model = RunsModel(runs)
    model.refresh()
    assert set(model.rows) == {path.name, healthy.name}
    for row in model.view():
        assert row.state in STATE_ORDER
        cells = row_cells(row)
        assert all(isinstance(c, str) and c.replace("\t", " ").isprintable() for c in cells.values()), cells
    assert (model.rows[path.name].state == "unreadable") == bool(read_status_checked(path)[1])
    follower = RunFollower(path)
    follower.poll()
    follower.metric_names()
    for name in follower.columns:
        follower.series(name)
        follower.series(name, "wall_s")
    follower.last_metrics()
    follower.block_rows()
    for name in follower.metric_names():  # what the run screen draws
        for log_y in (False, True):
            line_chart([Series(name, *follower.series(name))], 60, 12, log_y=log_y)
    for measure in follower.measures.values():
        matrix = as_matrix(measure.value)
        if matrix is not None:
            heat_map(matrix, 30, 8)
    assert follower.note == "" or one_line(follower.note)
    read_tail(path)
    for row in diff_runs([path, healthy]):
        assert all(isinstance(c, str) for c in row.cells())
    # resume only queues `bcdcore run --resume` (whose checkpoint loading is weights_only): nothing in this
    # process reads checkpoint.pt, whatever bytes it holds
    runner = Runner(runs, slots=[cpu_slot()], restore_queue=False)
    try:
        assert runner.resume(path).spec.resume == str(path.resolve())
    except RunnerError as exc:
        assert one_line(str(exc))
    ws = Workstation(runs, runs.parent / "recipes", slots=[cpu_slot()])
    ws.model.refresh()
    comparison = ws.compare([path.name, healthy.name])
    for metric in comparison.metric_names():
        comparison.series(metric)


@SETTINGS
@given(files=run_files)
def test_every_reader_survives_any_run_files(files, capsys):
    with run_dir(files) as (runs, path, healthy):
        check_engine_readers(runs, path)
        check_ls(runs, path, capsys)
        check_tui_readers(runs, path, healthy)
        # the healthy run beside it reads as usual
        assert read_status(healthy)["state"] == "finished"
        assert RunsModel(runs).refresh().added >= {healthy.name}


@given(metrics_bytes, st.lists(st.integers(0, 400), max_size=4))
@settings(max_examples=150, deadline=None)
def test_event_tail_reads_what_read_events_reads_whatever_the_chunks(data, cuts):
    """Appended in pieces cut anywhere (inside a line, inside a UTF-8 character), the tail's events are the
    whole file's events: nothing torn, nothing lost, nothing twice."""
    data = data if data.endswith(b"\n") else data + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        tail, got = EventTail(path), []
        start = 0
        for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
            with open(path / "metrics.jsonl", "ab") as f:
                f.write(data[start:cut])
            start = max(start, cut)
            got += tail.poll()
        whole = read_events(path)
        assert got == whole or json.dumps(got, default=str) == json.dumps(list(whole), default=str)
        assert tail.bad_lines == whole.bad_lines or tail.bad_lines >= 0


@given(st.lists(st.sampled_from([b'{"v": 1, "kind": "metric", "round": 1, "train_loss": 2.0}',
                                 b'{"v": 1, "kind": "metric", "round": 2, "train_loss": 1.0}',
                                 b'{"v": 1, "kind": "metric", "round": 3, "train_loss": "nan"}']),
                min_size=1, max_size=6), metrics_bytes, recipe_bytes)
@settings(max_examples=30, deadline=None)
def test_plot_draws_or_says_why_in_one_line(good, extra, recipe):
    from bcdcore.plot import PlotError, plot_runs
    import matplotlib.pyplot as plt

    with run_dir({"status.json": SEED_STATUS, "metrics.jsonl": b"\n".join(good) + b"\n" + extra,
                  "recipe.toml": recipe}) as (runs, path, healthy):
        for which in ([path], [path, healthy], [healthy, path]):
            try:
                fig = plot_runs(which, x="round", y="train_loss", out=runs / "p.png")
                plt.close(fig)
            except PlotError as exc:
                assert one_line(str(exc)), str(exc)


@given(st.one_of(st.binary(max_size=200), with_field(b'{"points": [{"run_dir": "x"}], "recipe": "r"}')))
@settings(max_examples=80, deadline=None)
def test_sweep_summary_is_total(data):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sweep.json").write_bytes(data)
        summary = sweep_summary(Path(tmp))
        assert isinstance(summary["points"], list)
        assert "problem" not in summary or one_line(summary["problem"])


@given(recipe_bytes)
@settings(max_examples=120, deadline=None)
def test_recipe_validation_in_the_editor_is_total(data):
    """The recipes screen validates the editor's text on every key: any text gives a Validation."""
    text = data.decode("utf-8", errors="replace")
    result = validate_text(text, "r.toml")
    assert result.ok or one_line(result.message.splitlines()[0])


# ----------------------------------------------------------------------------------------------------------
# files that are not files

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
    assert f"\tfinished ({n} bad lines)\t4/4\t" in capsys.readouterr().out


@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda v: json.dumps(v).encode("utf-8", errors="surrogatepass"), json_values),
                 st.builds(lambda spec: json.dumps([{"id": "a1", "submitted": 1.0, "spec": spec}]).encode(),
                           st.dictionaries(st.sampled_from(["recipe", "resume", "label", "overrides", "slots",
                                                            "other"]), json_values, max_size=5))))
@settings(max_examples=100, deadline=None)
def test_a_saved_launch_queue_of_any_bytes_restores_or_is_dropped(data):
    """<runs>/.bcdtui/queue.json is read at start-up: what is not a queue entry is dropped, never raised."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / ".bcdtui").mkdir()
        (Path(tmp) / ".bcdtui" / "queue.json").write_bytes(data)
        runner = Runner(Path(tmp), slots=[cpu_slot()])
        for job in runner.jobs.values():
            assert isinstance(job.spec.recipe, str) and all(isinstance(o, str) for o in job.spec.overrides)
            assert job.state == "queued" and set(job.spec.slots) <= {"cpu"} and (job.spec.recipe or job.spec.resume)


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


finite_or_not = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(EXTREMES).map(float)


@given(st.lists(st.tuples(finite_or_not, finite_or_not), max_size=30), st.booleans(),
       st.integers(1, 200), st.integers(1, 60))
@settings(max_examples=300, deadline=None)
def test_charts_draw_any_numbers(points, log_y, width, height):
    """A diverged run's 1e308 or 5e-324 is valid data: the charts draw it (clipped), never raise."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    lines = line_chart([Series("a", xs, ys), Series("b", ys, xs)], width, height, log_y=log_y)
    assert len(lines) <= max(4, height)
    heat_map([ys[:5], xs[:7]] if points else [[]], width, height)
    sparkline(ys, width)
