"""`bcdcore ls` (aligned columns, --state, --tag, --json) and `bcdcore tag` over run directories written as plain
files (bcdtui.synthetic: no training), through bcdcore.cli.main in this process."""
from __future__ import annotations

import json
import time

import pytest

from bcdcore.annotations import update_annotations
from bcdcore.cli import main
from bcdcore.rundir import read_events
from bcdtui.synthetic import write_run

IDS = {"done": "adam-20261202-101500-a1b2c3", "killed": "sgd-20261202-101600-0f0f0f",
       "failed": "lion-20261202-101700-777777", "broken": "mlp-20261202-101800-123456"}
STARTED = 1_796_000_000.0


@pytest.fixture
def runs(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs, IDS["done"], state="finished", rounds=30, started=STARTED)
    write_run(runs, IDS["killed"], state="killed", rounds=30, done=15, eval_every=4, started=STARTED + 60)
    write_run(runs, IDS["failed"], state="failed", rounds=20, done=3, started=STARTED + 120)
    write_run(runs, IDS["broken"], state="finished", rounds=10, started=STARTED + 180)
    (runs / IDS["broken"] / "status.json").write_text("[]")
    monkeypatch.setenv("BCD_RUNS", str(runs))
    return runs


def ls(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["ls", *args])
    out, err = capsys.readouterr()
    return code, out, err


def ls_json(capsys, *args) -> dict[str, dict]:
    code, out, err = ls(capsys, "--json", *args)
    assert code == 0 and err == ""
    return {r["id"]: r for r in json.loads(out)}


def last(run_dir, key):
    return [e[key] for e in read_events(run_dir) if e["kind"] == "metric" and key in e][-1]


def test_columns_are_aligned_and_show_the_primary_validation_metric_after_the_state(runs, capsys):
    code, out, err = ls(capsys)
    assert code == 0 and err == ""
    header, *rows = out.splitlines()
    assert header.split() == ["run", "state", "val", "round", "started", "note"]
    assert len(rows) == 4
    for word in ("state", "val", "round", "started"):  # every cell starts under its header
        column = header.index(word)
        assert all(row[column - 2:column] == "  " and row[column] != " " for row in rows if "unreadable" not in row)
    done, killed = rows[0].split(), rows[3].split()
    assert done[:5] == ["adam-a1b2c3", "finished", "val_acc", f"{last(runs / IDS['done'], 'val_acc'):.4f}", "30/30"]
    assert " ".join(done[5:7]) == time.strftime("%m-%d %H:%M", time.localtime(STARTED))
    # killed at round 15, last evaluated at round 12: the val cell shows round 12's value, not a blank
    assert killed[:5] == ["sgd-0f0f0f", "killed", "val_acc", f"{last(runs / IDS['killed'], 'val_acc'):.4f}", "15/30"]
    assert rows[2].split()[:2] == ["mlp-123456", "unreadable"]
    assert rows[2].endswith("status.json: not a JSON object (a list)")  # listed, with its reason
    assert all(len(row) <= 80 for row in rows if "unreadable" not in row)  # fits an 80-column terminal


def test_state_filter_takes_lists_and_repeats(runs, capsys):
    assert set(ls_json(capsys, "--state", "finished")) == {IDS["done"]}
    assert set(ls_json(capsys, "--state", "killed,failed")) == {IDS["killed"], IDS["failed"]}
    assert set(ls_json(capsys, "--state", "unreadable", "--state", "killed")) == {IDS["broken"], IDS["killed"]}
    code, out, _ = ls(capsys, "--state", "running")
    assert code == 0 and out.strip().endswith("match --state running (of 4)")
    assert ls_json(capsys, "--state", "running") == {}


@pytest.mark.parametrize("args, fragment", [
    (["--state", "finised"], "unknown state (did you mean 'finished'?)"),
    (["--state", "done,killed"], "--state 'done'"),
    (["--tag", "two words"], "tag 'two words'"),
])
def test_bad_filters_are_one_line_and_exit_2(runs, capsys, args, fragment):
    code, out, err = ls(capsys, *args)
    assert (code, out) == (2, "") and err.count("\n") == 1 and fragment in err, err


def test_tags_filter_and_show_and_a_display_name_replaces_the_recipe_name(runs, capsys):
    update_annotations(runs / IDS["done"], add_tags=["baseline", "paper"], name="adam-wide")
    update_annotations(runs / IDS["killed"], add_tags=["paper"], notes="diverged at lr 0.3?\nretry")
    assert set(ls_json(capsys, "--tag", "paper")) == {IDS["done"], IDS["killed"]}
    assert set(ls_json(capsys, "--tag", "paper", "--tag", "baseline")) == {IDS["done"]}  # all must match
    assert set(ls_json(capsys, "--tag", "paper", "--state", "killed")) == {IDS["killed"]}
    _, out, _ = ls(capsys, "--tag", "paper")
    header, first, second = out.splitlines()
    assert header.split()[-1] == "tags" and first.startswith("adam-wide-a1b2c3  ")
    assert first.endswith("  baseline,paper") and second.endswith("  paper")


def test_json_lists_every_run_with_ids_state_metrics_and_annotations(runs, capsys):
    update_annotations(runs / IDS["done"], add_tags=["x"], name="first", notes="n")
    records = ls_json(capsys)
    done, killed, broken = records[IDS["done"]], records[IDS["killed"]], records[IDS["broken"]]
    for key in ("run", "path", "state", "reason", "holder", "round", "rounds", "train_loss", "val", "test",
                "bad_lines", "note"):  # what earlier versions printed stays
        assert key in done
    assert (done["id"], done["display_id"], done["path"]) == (IDS["done"], "first-a1b2c3", str(runs / IDS["done"]))
    assert (done["name"], done["tags"], done["notes"], done["holder"]) == ("first", ["x"], "n", None)
    events = [e for e in read_events(runs / IDS["done"]) if e["kind"] == "metric"]
    assert done["metrics"] == {k: v for k, v in events[-1].items() if k not in ("v", "kind", "t", "round")}
    assert done["val"] == {"name": "val_acc", "value": events[-1]["val_acc"]}
    assert done["test"] == {"name": "test_acc", "value": events[-1]["test_acc"]}
    assert killed["metrics"]["val_acc"] == last(runs / IDS["killed"], "val_acc") and "test_acc" not in killed["metrics"]
    assert killed["metrics"]["train_loss"] == last(runs / IDS["killed"], "train_loss")
    assert (broken["state"], broken["reason"]) == ("unreadable", "status.json: not a JSON object (a list)")
    assert broken["metrics"]["val_acc"] == last(runs / IDS["broken"], "val_acc")  # the events still tell


def test_an_annotations_file_that_cannot_be_read_is_named_not_fatal(runs, capsys):
    (runs / IDS["failed"] / "annotations.json").write_bytes(b"\xff{")
    records = ls_json(capsys)
    assert records[IDS["failed"]]["tags"] == [] and records[IDS["failed"]]["annotations_problem"]
    _, out, _ = ls(capsys)
    row = next(line for line in out.splitlines() if line.startswith("lion-777777"))
    assert "annotations.json: " in row and row.split()[1] == "failed"
    code = main(["tag", "lion", "--add", "x"])
    _, err = capsys.readouterr()
    assert code == 2 and "fix or remove the file" in err and err.count("\n") == 1
    assert (runs / IDS["failed"] / "annotations.json").read_bytes() == b"\xff{"  # the user's file is kept


# ----------------------------------------------------------------------------------------------------------
# bcdcore tag

def tag(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["tag", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_tag_adds_removes_names_and_notes_and_prints_what_is_stored(runs, capsys, tmp_path):
    code, out, err = tag(capsys, "adam", "--add", "a", "b", "--add", "c", "--name", "wide")
    assert code == 0 and err == ""
    assert out.splitlines() == [f"run:   wide-a1b2c3  ({runs / IDS['done']})", "name:  wide", "tags:  a, b, c",
                                "notes: "]
    notes = tmp_path / "notes.md"
    notes.write_text("first line\nsecond line\n")
    code, out, _ = tag(capsys, "wide", "--remove", "b", "--notes-file", str(notes))  # looked up by its new name
    assert code == 0 and out.splitlines()[2:] == ["tags:  a, c", "notes: first line", "       second line"]
    stored = json.loads((runs / IDS["done"] / "annotations.json").read_text())
    assert stored == {"version": 1, "name": "wide", "tags": ["a", "c"], "notes": "first line\nsecond line\n"}
    code, out, _ = tag(capsys, str(runs / IDS["done"]), "--name", "", "--notes", "")  # a path; "" clears
    assert code == 0 and out.splitlines()[:2] == [f"run:   adam-a1b2c3  ({runs / IDS['done']})", "name:  "]
    code, out, _ = tag(capsys, "adam-a1b2c3")  # nothing to change: shows what is stored
    assert code == 0 and out.splitlines()[2] == "tags:  a, c"


@pytest.mark.parametrize("args, fragment", [
    (["nothing-like-it", "--add", "x"], "nor the id of a run in"),
    (["-", "--add", "x"], "not a run directory"),
    (["adam", "--add", "no spaces"], "tag 'no spaces'"),
    (["adam", "--notes", "a", "--notes-file", "f"], "not both"),
    (["adam", "--notes-file", "/nonexistent/notes.md"], "no such file"),
    (["adam", "--name", "tab\there"], "control characters"),
])
def test_tag_errors_are_one_line_and_exit_2(runs, capsys, args, fragment):
    code, out, err = tag(capsys, *args)
    assert (code, out) == (2, "") and err.count("\n") == 1 and fragment in err, err
    assert not (runs / IDS["done"] / "annotations.json").exists()  # nothing was written


def test_tag_on_an_ambiguous_reference_names_the_candidates(runs, capsys):
    write_run(runs, "adam-20261202-121500-a1b2c3", state="finished", rounds=3)  # the same recipe again
    code, _, err = tag(capsys, "adam-a1b2c3", "--add", "x")
    assert code == 2 and "2 runs match" in err and IDS["done"] in err and "adam-20261202-121500-a1b2c3" in err


def test_notes_from_stdin_must_be_utf8(runs, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("première\nligne".encode())))
    code, out, _ = tag(capsys, "adam", "--notes-file", "-")
    assert code == 0 and out.splitlines()[3:] == ["notes: première", "       ligne"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"ok\xff")))
    code, out, err = tag(capsys, "adam", "--notes-file", "-")
    assert (code, out) == (2, "") and "not UTF-8 text (byte 2)" in err
    assert json.loads((runs / IDS["done"] / "annotations.json").read_text())["notes"] == "première\nligne"
