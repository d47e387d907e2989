"""The runs model's bookkeeping for many runs, with the thresholds made small: the first load reads the newest
runs' statuses first (by the time in their ids) and the rest later, counts and live runs are kept row by row,
and ended runs are re-checked in turns without losing a resume or an annotation."""
from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest

from bcdcore.rundir import id_time
from bcdtui import runs as runs_module
from bcdtui.app import BcdApp
from bcdtui.runner import cpu_slot
from bcdtui.runs import RunsModel
from bcdtui.synthetic import write_run


def run_id(i: int) -> str:
    return f"r-20261126-{i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}-{i:06x}"


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(runs_module, "DEFER_ABOVE", 5)
    monkeypatch.setattr(runs_module, "STATUS_FIRST", 3)
    monkeypatch.setattr(runs_module, "ENDED_CHECKS_PER_REFRESH", 2)


def recount(model: RunsModel) -> tuple[dict, list]:
    rows = model.rows.values()
    live = sorted((str(r.path), r.gpu) for r in rows if r.path is not None and r.host in ("", model.host)
                  and (r.state == "running" or (r.state == "queued" and r.pid)))
    return dict(Counter(r.state for r in rows)), live


def test_id_time_orders_ids_as_their_start_times():
    assert id_time("a-b-20261126-010203-abcdef") == "20261126-010203"
    assert id_time("a-20261126-010203-abcdef-2") == "20261126-010203"
    assert id_time("my-run") == ""
    assert sorted([run_id(70), run_id(5), run_id(3600)], key=id_time) == [run_id(5), run_id(70), run_id(3600)]


def test_the_first_load_of_many_runs_reads_the_newest_statuses_first(tmp_path, small):
    runs = tmp_path / "runs"
    for i in range(12):
        write_run(runs, run_id(i), state="finished", rounds=4, started=1_795_000_000.0 + i)
    # an old run still running (its process is this test's): read late, but then counted and live
    write_run(runs, run_id(0), state="running", rounds=4, pid=os.getpid(), started=1_795_000_000.0)
    write_run(runs, "odd-name", state="failed", rounds=4, started=1_700_000_000.0)  # no time in its id: first
    app = BcdApp(runs, tmp_path / "recipes", slots=[cpu_slot()])
    ws = app.ws
    model = ws.model
    first = model.refresh(defer=True)
    assert first.added == {run_id(11), run_id(10), "odd-name"}
    assert model.unread_statuses == 10
    assert model.pending >= 10
    assert ws.known_live() is None  # slots are not judged from a partial list
    assert app.status_line() == "reading the status of 10 more runs…"  # not counts of a partial list
    model.refresh()  # a periodic refresh reads none of the waiting statuses
    assert set(model.rows) == first.added
    write_run(runs, run_id(50), state="running", rounds=4, pid=os.getpid())  # a launch meanwhile: a new entry
    assert model.refresh().added == {run_id(50)} and model.unread_statuses == 10  # still none of the others
    first.added.add(run_id(50))
    added = set()
    while model.unread_statuses:
        added |= model.fill(1e-9).added  # one run per call at least
    assert added == {run_id(i) for i in range(10)}
    while model.pending:
        model.fill(1.0)
    assert model.rows[run_id(0)].state == "running"
    assert model.counts() == recount(model)[0] == {"finished": 11, "running": 2, "failed": 1}
    assert sorted(model.live_runs()) == recount(model)[1] == [(str(runs / run_id(i)), "") for i in (0, 50)]
    assert ws.known_live() == model.live_runs()
    assert app.status_line().startswith("2 running · 1 failed · cpu 2/")
    assert all(math.isfinite(r.train_loss) for r in model.rows.values())  # every events' tail read


def test_counts_and_live_runs_follow_every_change(tmp_path, small):
    runs = tmp_path / "runs"
    for i in range(8):
        write_run(runs, run_id(i), state="running" if i % 3 == 0 else "finished", rounds=4, pid=os.getpid())
    model = RunsModel(runs)
    model.refresh()
    assert (model.counts(), sorted(model.live_runs())) == recount(model)
    # a live run ends, an ended one is resumed, one directory goes, one comes
    write_run(runs, run_id(0), state="finished", rounds=4)
    write_run(runs, run_id(1), state="running", rounds=4, pid=os.getpid())
    (runs / run_id(2) / "status.json").unlink()
    (runs / run_id(2) / "metrics.jsonl").unlink()
    write_run(runs, run_id(20), state="failed", rounds=4)
    for _ in range(8):  # within the turns of the ended runs
        model.refresh()
        assert (model.counts(), sorted(model.live_runs())) == recount(model)
    assert model.rows[run_id(0)].state == "finished"
    assert model.rows[run_id(1)].state == "running"
    assert run_id(2) not in model.rows
    assert model.rows[run_id(20)].state == "failed"
    assert model.counts() == {"running": 3, "finished": 4, "failed": 1}


def test_ended_runs_are_checked_in_turns_and_none_is_missed(tmp_path, small):
    runs = tmp_path / "runs"
    for i in range(10):
        write_run(runs, run_id(i), state="finished", rounds=4)
    model = RunsModel(runs)
    model.refresh()
    for i in range(10):
        (runs / run_id(i) / "annotations.json").write_text(json.dumps({"version": 1, "tags": [f"t{i}"]}))
    stats = []
    real_sig = runs_module.file_sig
    turns = 5  # 10 ended runs, 2 per refresh
    for _ in range(turns):
        before = len(stats)
        runs_module.file_sig = lambda path, _sig=real_sig: (stats.append(path), _sig(path))[1]
        try:
            model.refresh()
        finally:
            runs_module.file_sig = real_sig
        assert len([p for p in stats[before:] if p.endswith("status.json")]) == 2  # only this turn's share
    assert all(model.rows[run_id(i)].tags == (f"t{i}",) for i in range(10))
    # one the user just annotated is seen at once, whatever its turn
    (runs / run_id(7) / "annotations.json").write_text(json.dumps({"version": 1, "tags": ["now"]}))
    model.refresh(force={run_id(7)})
    assert model.rows[run_id(7)].tags == ("now",)
