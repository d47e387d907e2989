"""Issue 11's done-when line: a runs directory of 1,000 runs, 100 of them randomly corrupted, lists the 900
healthy runs as usual, with the rest marked `unreadable: <reason>`, in `bcdcore ls` (a real subprocess) and in
the TUI's runs table (a Textual pilot). The runs are plain file writes (tests/run_corpus.py), no training."""
from __future__ import annotations

import json
import os

import pytest
from conftest import cli_env, run_cli
from run_corpus import STATUS_CORRUPTIONS, corrupted_runs_dir
from textual.widgets import DataTable

from bcdtui.app import BcdApp
from bcdtui.runner import Slot
from bcdtui.screens import RunScreen

N_RUNS, N_BAD = 1000, 100


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(runs dir, healthy paths, {corrupted path: how}); made once for both tests (about a second)."""
    runs_dir = tmp_path_factory.mktemp("corrupt") / "runs"
    healthy, bad = corrupted_runs_dir(runs_dir, N_RUNS, N_BAD, seed=11)
    assert len(healthy) == N_RUNS - N_BAD and len(bad) == N_BAD
    assert set(bad.values()) == set(STATUS_CORRUPTIONS)  # every kind of corruption is among the 100
    return runs_dir, healthy, bad


def expected_row(path) -> tuple[str, str]:
    """(state, round/rounds) of a healthy run, from what was written."""
    status = json.loads((path / "status.json").read_text())
    return status["state"], f"{status['progress']['round']}/{status['progress']['rounds']}"


def test_ls_lists_the_healthy_runs_and_marks_the_corrupted(runs):
    runs_dir, healthy, bad = runs
    proc = run_cli("ls", "--runs-dir", str(runs_dir), cwd=runs_dir.parent, env=cli_env(), timeout=120)
    as_json = run_cli("ls", "--runs-dir", str(runs_dir), "--json", cwd=runs_dir.parent, env=cli_env(), timeout=120)
    assert proc.returncode == as_json.returncode == 0, proc.stderr + as_json.stderr
    assert proc.stderr == as_json.stderr == ""
    header, *lines = proc.stdout.splitlines()
    assert header.split()[:5] == ["run", "state", "val", "round", "started"]
    records = json.loads(as_json.stdout)
    assert len(lines) == len(records) == len({r["id"] for r in records}) == N_RUNS
    rows = {r["id"]: (r, line) for r, line in zip(records, lines)}  # the table lists the runs in the same order
    for path in healthy:
        state, progress = expected_row(path)
        record, line = rows[path.name]
        assert line.startswith(record["display_id"] + " ")
        cells = line[len(record["display_id"]):].split()
        assert [cells[0], cells[3]] == [state, progress], (path.name, line)
        assert cells[1] == record["val"]["name"] and float(cells[2]) == round(record["val"]["value"], 4)
        assert record["train_loss"] > 0  # the final train_loss, read from its events
    reasons = set()
    for path, how in bad.items():
        record, line = rows[path.name]
        assert line[len(record["display_id"]):].split()[0] == "unreadable", (how, line)
        reason = record["reason"]
        assert "  " + reason in line, (how, line)  # in the note cell, the last one
        assert reason and "Traceback" not in reason and len(reason) < 200, (how, reason)
        reasons.add(reason.split(":")[0])
    assert len(reasons) > 3  # the corruptions are of many kinds, each with its own reason


async def test_tui_shows_the_healthy_runs_and_marks_the_corrupted(runs, monkeypatch):
    runs_dir, healthy, bad = runs
    monkeypatch.chdir(runs_dir.parent)
    app = BcdApp(runs_dir, runs_dir.parent / "recipes", slots=[Slot("cpu", "CPU", "")], refresh_s=0.25)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause()
        table = app.runs_screen.query_one("#runs", DataTable)
        assert table.row_count == N_RUNS

        def cell(path, column: str) -> str:
            return str(table.get_cell(path.name, column))

        for path in healthy:
            state, progress = expected_row(path)
            assert (cell(path, "state"), cell(path, "round")) == (state, progress), path.name
            assert cell(path, "train_loss")
        for path, how in bad.items():
            assert cell(path, "state").startswith("unreadable: "), (how, cell(path, "state"))
            row = app.ws.model.rows[path.name]
            assert row.state == "unreadable" and row.error, how
        assert f"{N_BAD} unreadable" in app.status_line()
        # the problems filter shows the unreadable runs among the failed, killed and lost ones
        await pilot.press("f", "f", "f")
        assert app.ws.model.state_filter == "problems"
        await pilot.pause()
        assert all(app.ws.model.rows[str(k.value)].state != "finished" for k in table.rows)
        assert sum(app.ws.model.rows[str(k.value)].state == "unreadable" for k in table.rows) == N_BAD
        # opening an unreadable run shows its reason instead of failing
        target = sorted(bad)[0]
        await pilot.press("f")
        await pilot.pause()
        table.move_cursor(row=table.get_row_index(target.name))
        await pilot.press("enter")
        for _ in range(100):  # a loaded machine may take a few frames to open the screen
            if isinstance(app.screen, RunScreen) and app.screen.query_one("#summary").text_lines:
                break
            await pilot.pause(0.05)
        assert isinstance(app.screen, RunScreen) and app.screen.run_id == target.name
        text = " ".join(line.plain for line in app.screen.query_one("#summary").text_lines)
        assert "unreadable: " in text, text


async def test_every_screen_over_broken_runs_and_recipes(tmp_path, monkeypatch):
    """Compare an unreadable run with a healthy one, open a broken run's screen, and load recipe files that
    are not UTF-8, not TOML, nested too deep or a FIFO: each shows its one line, nothing raises."""
    from run_corpus import STATUS_CORRUPTIONS, healthy_run

    from bcdtui.screens import CompareScreen, RecipesScreen

    monkeypatch.chdir(tmp_path)
    runs, recipes = tmp_path / "runs", tmp_path / "recipes"
    broken = healthy_run(runs, 0)
    healthy_run(runs, 1)
    STATUS_CORRUPTIONS["deep nesting"](broken, None)
    (broken / "recipe.toml").write_bytes(b"\xff\xfe[run]")
    recipes.mkdir()
    (recipes / "latin1.toml").write_bytes(b'[run]\nname = "caf\xe9"\n')
    (recipes / "deep.toml").write_bytes(b"a = " + b"[" * 5000 + b"]" * 5000)
    (recipes / "dotted.toml").write_bytes(b"[" + b".".join([b"k"] * 3000) + b"]\nx = 1\n")
    os.mkfifo(recipes / "fifo.toml")
    app = BcdApp(runs, recipes, slots=[Slot("cpu", "CPU", "")], refresh_s=0.25)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        table = app.runs_screen.query_one("#runs", DataTable)
        for row in range(2):
            table.move_cursor(row=row)
            await pilot.press("space")
        await pilot.press("c")
        for _ in range(100):
            if isinstance(app.screen, CompareScreen):
                break
            await pilot.pause(0.05)
        assert isinstance(app.screen, CompareScreen)
        await pilot.press("d")
        await pilot.pause()
        await pilot.press("escape")
        await pilot.press("f3")
        for _ in range(100):
            if isinstance(app.screen, RecipesScreen):
                break
            await pilot.pause(0.05)
        screen = app.screen
        assert isinstance(screen, RecipesScreen)
        messages = []
        monkeypatch.setattr(screen, "fail", lambda exc: messages.append(str(exc)))
        for name in ("latin1.toml", "fifo.toml"):
            screen.load(recipes / name)
            await pilot.pause()
        for name in ("deep.toml", "dotted.toml"):
            screen.load(recipes / name)
            await pilot.pause()
            result = screen.validate_now()
            assert not result.ok and "nested too deeply" in result.message, result.message
        assert any("not UTF-8" in m for m in messages) and any("not a regular file" in m for m in messages)
        assert len(messages) == 2 and all("\n" not in m for m in messages)


def extreme_run(runs, i: int):
    """A readable run whose events hold what a diverged or odd run may write: 1e308, "-inf", nan, huge
    rounds, ragged and empty measurement matrices, unknown kinds, a time of year 9999."""
    from run_corpus import healthy_run

    path = healthy_run(runs, i)
    lines = [
        {"kind": "metric", "t": 253402300799.0, "round": 5, "train_loss": 1e308, "val_loss": "-inf",
         "val_acc": "nan", "grad_evals": 1.7976931348623157e308, "wall_s": 1e300, "samples": 2 ** 63 - 1},
        {"kind": "metric", "t": 0.0, "round": 2 ** 62, "train_loss": -1e308, "test_acc": 5e-324},
        {"kind": "block", "round": 2 ** 62, "block": 0, "residual": "inf", "threshold": "nan", "lambda": 1e308},
        {"kind": "measure", "round": 3, "unit": "ragged", "value": [[1e308, None], [], [-1e308, 2, 3]]},
        {"kind": "measure", "round": 3, "unit": "empty", "value": []},
        {"kind": "measure", "round": 4, "unit": "scalar", "value": "nan", "note": {"deep": [[["x"]]]}},
        {"kind": "future_kind", "payload": [1, 2, 3]},
        {"kind": "end", "state": "lost", "reason": "\x1b[2J" * 3},
    ]
    with open(path / "metrics.jsonl", "a") as f:
        for line in lines:
            f.write(json.dumps({"v": 1, **line}) + "\n")
    return path


async def test_every_run_screen_over_broken_and_extreme_runs(tmp_path, monkeypatch):
    """Open each run of a directory of broken and extreme runs, cycle its chart (metric, x axis, log y) and its
    side panel through every measurement, then compare them all: nothing raises."""
    import random

    from run_corpus import EVENT_CORRUPTIONS, STATUS_CORRUPTIONS, healthy_run

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    rng = random.Random(5)
    paths = [extreme_run(runs, 0), extreme_run(runs, 1)]
    for i, name in enumerate(sorted(STATUS_CORRUPTIONS)[::3]):
        path = healthy_run(runs, 10 + i)
        STATUS_CORRUPTIONS[name](path, rng)
        paths.append(path)
    for i, how in enumerate(EVENT_CORRUPTIONS.values()):
        path = healthy_run(runs, 50 + i)
        how(path, rng)
        paths.append(path)
    app = BcdApp(runs, tmp_path / "recipes", slots=[Slot("cpu", "CPU", "")], refresh_s=0.25)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause()
        table = app.runs_screen.query_one("#runs", DataTable)
        assert table.row_count == len(paths)
        for path in paths:
            table.move_cursor(row=table.get_row_index(path.name))
            await pilot.press("enter")
            for _ in range(100):
                if isinstance(app.screen, RunScreen):
                    break
                await pilot.pause(0.05)
            assert isinstance(app.screen, RunScreen) and app.screen.run_id == path.name
            for key in ("y", "y", "y", "x", "x", "g", "m", "m", "m", "m", "g"):
                await pilot.press(key)
            await pilot.pause()
            await pilot.press("escape")
            await pilot.pause()
        for row in range(len(paths)):
            table.move_cursor(row=row)
            await pilot.press("space")
        await pilot.press("c")
        await pilot.pause()
        for key in ("y", "x", "g", "d", "d"):
            await pilot.press(key)
        await pilot.pause()


async def test_a_runs_directory_that_is_a_file_and_no_recipes(tmp_path, monkeypatch):
    """The app starts over a runs "directory" that is a file, and its launch dialog opens with no recipes at
    all (an empty Select once failed to mount)."""
    from bcdtui.screens import LaunchScreen

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("not a directory")
    app = BcdApp(tmp_path / "runs", tmp_path / "no-recipes", slots=[Slot("cpu", "CPU", "")], refresh_s=0.25)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.3)
        assert app.runs_screen.query_one("#runs", DataTable).row_count == 0
        await pilot.press("l")
        for _ in range(100):
            if isinstance(app.screen, LaunchScreen):
                break
            await pilot.pause(0.05)
        assert isinstance(app.screen, LaunchScreen)
        assert app.screen.choices()[0] is None
        await pilot.press("escape")
        await pilot.pause()
