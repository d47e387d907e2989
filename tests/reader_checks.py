"""What every reader must do with one run directory, whatever its files hold: the checks shared by the property
tests (test_readers_total.py) and the edge cases (test_readers_edges.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bcdcore.cli import cmd_ls
from bcdcore.records import STATES, check_event, check_status
from bcdcore.rundir import (
    list_runs,
    metric_table,
    read_events,
    read_recipe_dict,
    read_status,
    read_status_checked,
    run_state,
)
from bcdtui.charts import Series, as_matrix, heat_map, line_chart
from bcdtui.diff import diff_runs
from bcdtui.runner import Runner, RunnerError, cpu_slot
from bcdtui.runs import STATE_ORDER, RunsModel, row_cells
from bcdtui.tailer import RunFollower, read_tail
from bcdtui.workstation import Workstation


def one_line(text: str) -> bool:
    return bool(text) and text.isprintable() and len(text) < 400


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
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["run", "state", "val"]
    assert all(line.isprintable() for line in lines)
    assert cmd_ls(argparse.Namespace(runs_dir=runs, json=True)) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in records] == [p.name for p in list_runs(runs)]
    status, problem = read_status_checked(path)
    index = [r["id"] for r in records].index(path.name)
    assert (records[index]["state"] == "unreadable") == bool(problem)
    row = lines[1 + index]  # rows in the order of the list
    assert row.startswith(records[index]["display_id"] + " ")
    assert (row[len(records[index]["display_id"]):].split()[0] == "unreadable") == bool(problem)


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
