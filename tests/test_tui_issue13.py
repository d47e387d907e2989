"""Issue 13, the runs table and run screen: one pilot test per bug the issue lists (each failed before its fix),
plus the new keys (annotations, filters, confirmations, empty state, scrolling, panels, the full-screen log)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import TINY
from tui_tools import cursor_to, make_app, real_runs, table, until

from bcdtui.app import BcdApp
from bcdtui.screens import ConfirmScreen, RunsScreen


def cursor_run(app: BcdApp) -> str | None:
    return app.runs_screen.current_id()


async def answer_yes(pilot, app) -> None:
    await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), 5, "the confirmation")
    await pilot.press("y")


# ----------------------------------------------------------------------------------------------------------
# with the real engine

async def test_killed_and_resumed_run_shows_running_not_lost(place):
    app = make_app(place)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("l")
        await pilot.click("#overrides")
        await pilot.press(*"run.rounds=100000")
        await pilot.press("ctrl+l")
        await until(pilot, lambda: len(real_runs(app)) == 1, 120, "the run directory")
        run_id = real_runs(app)[0]
        await until(pilot, lambda: app.ws.model.rows[run_id].state == "running"
                    and app.ws.model.rows[run_id].round >= 1, 120, "a running round")
        await pilot.press("k")
        if isinstance(app.screen, ConfirmScreen):
            await pilot.press("y")
        await until(pilot, lambda: app.ws.model.rows[run_id].state == "killed", 60, "state killed")
        round_then = app.ws.model.rows[run_id].round
        assert cursor_run(app) == run_id
        await pilot.press("u")
        await until(pilot, lambda: app.ws.model.rows[run_id].round > round_then + 1, 120, "rounds after resume")
        states = set()
        for _ in range(10):  # it trains: every refresh must say running
            await pilot.pause(0.1)
            states.add(app.ws.model.rows[run_id].state)
        assert states == {"running"}, states
        assert cursor_run(app) == run_id  # the cursor stayed on the resumed run through the launch row
        await pilot.press("k")
        if isinstance(app.screen, ConfirmScreen):
            await pilot.press("y")
        await until(pilot, lambda: app.ws.model.rows[run_id].state == "killed", 60, "killed again")


# ----------------------------------------------------------------------------------------------------------
# with synthetic runs and a stand-in engine (fast)

ENGINE = r'''
import os, sys, time
args = sys.argv[1:]
if "--resume" in args:
    print(f"run directory: {args[args.index('--resume') + 1]}", flush=True)  # then "trains": sleeps
    time.sleep(float(os.environ.get("FAKE_SLEEP", "30")))
    sys.exit(0)
recipe = next(a for a in args[1:] if a.endswith(".toml"))
if "broken" in open(recipe).read():
    print(f"error: {recipe}:1: [run] broken: refused by the engine on purpose", file=sys.stderr)
    sys.exit(2)
time.sleep(float(os.environ.get("FAKE_SLEEP", "30")))  # a launch that has not made its directory yet
'''


@pytest.fixture
def demo(place):
    from bcdtui.synthetic import demo_runs
    demo_runs(place / "runs")
    (place / "engine.py").write_text(ENGINE)
    return place


def demo_app(place: Path, **kwargs) -> BcdApp:
    import sys
    kwargs.setdefault("engine", [sys.executable, str(place / "engine.py")])
    kwargs.setdefault("per_slot", 8)
    return make_app(place, **kwargs)


def collect_notes(app: BcdApp) -> list[str]:
    notes: list[str] = []
    original = app.notify

    def notify(message, **kwargs):
        notes.append(str(message))
        original(message, **kwargs)

    app.notify = notify  # type: ignore[method-assign]
    return notes


def screen_text(app: BcdApp) -> str:
    """What the terminal shows, as plain text lines (from the SVG screenshot)."""
    import html
    import re
    svg = app.export_screenshot()
    rows: dict[str, list[tuple[float, str]]] = {}
    for y, x, text in re.findall(r'<text[^>]*?x="([\d.]+)" y="([\d.]+)"[^>]*>(.*?)</text>', svg):
        rows.setdefault(x, []).append((float(y), html.unescape(text).replace("\xa0", " ")))
    return "\n".join("".join(t for _, t in sorted(parts)) for _, parts in sorted(rows.items(), key=lambda r: float(r[0])))


def cell_fits(app: BcdApp) -> list[str]:
    """Cells wider than their column (what would be cut), as 'row/column: text'."""
    t = table(app)
    bad = []
    for row_key in list(t.rows):
        for col_key, column in t.columns.items():
            cell = t.get_cell(row_key, col_key)
            width = getattr(cell, "cell_len", len(str(cell)))
            if width > column.content_width:
                bad.append(f"{row_key.value}/{col_key.value}: {getattr(cell, 'plain', cell)!r}")
    return bad


async def test_cells_updated_in_place_are_never_cut(demo):
    from bcdtui.synthetic import write_run
    runs = demo / "runs"
    run_id = "grow-20261126-050000-abc123"
    write_run(runs, run_id, state="running", rounds=300, done=6, host="gpu-box", pid=4250, eval_every=10 ** 6)
    app = demo_app(demo)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: run_id in app.ws.model.rows, 5, "the run")
        await pilot.pause()
        # it trains on: 60/300 (one more digit), an ETA, and now a validation value in a column that was narrow
        write_run(runs, run_id, state="running", rounds=300, done=60, host="gpu-box", pid=4250, eval_every=1)
        await until(pilot, lambda: app.ws.model.rows[run_id].round == 60, 5, "the update")
        await pilot.pause()
        assert app.ws.model.rows[run_id].val_name
        assert cell_fits(app) == []
        t = table(app)
        assert t.get_cell(run_id, "round").plain == "60/300"


async def test_every_validation_value_shows_whole_at_80_columns(demo):
    app = demo_app(demo)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        text = screen_text(app)
        from bcdtui.cells import row_cells
        for row in app.ws.model.rows.values():
            val = row_cells(row)["val"]
            assert val and val in text, (row.id, val)
            assert f"{row.display}" in text  # the short display id, not the 34-column run id
        assert "20261126" not in text  # the start time is in `started`, not in the id


def test_runner_bookkeeping_of_an_earlier_launch_does_not_make_a_live_run_lost(tmp_path):
    """The runs model asked the runner whether "our launch exited" by run directory name: a run killed and
    resumed has an exited job of the same directory, so the resumed, training run showed `lost`."""
    import socket

    from bcdtui.runner import Job, LaunchSpec
    from bcdtui.runs import RunsModel
    from bcdtui.synthetic import write_run
    path = write_run(tmp_path, "tiny-20261126-050000-abc123", state="running", rounds=10, done=3,
                     host=socket.gethostname(), pid=os.getpid())  # alive: this process
    old = Job(spec=LaunchSpec(recipe="x.toml"), run_dir=str(path))
    old.state = "exited"  # the launch that was killed
    model = RunsModel(tmp_path)
    model.refresh(jobs=[old])
    assert model.rows[path.name].state == "running"


async def test_cursor_stays_on_its_run_after_resume_and_goes_to_a_rerun(demo):
    killed = "quickstart-20261126-042000-0c0ffe"
    (demo / "runs" / killed / "checkpoint.pt").write_bytes(b"x")
    app = demo_app(demo)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause()
        t = table(app)
        cursor_to(app, killed)
        await pilot.pause()
        index_before = t.cursor_row
        await pilot.press("u")
        job = next(iter(app.ws.runner.jobs.values()))
        # the launch row comes (newest first: above) and goes (its directory is the run's own)
        await until(pilot, lambda: job.run_dir != "", 10, "the resume to link its directory")
        await until(pilot, lambda: f"job:{job.id}" not in app.runs_screen._cells, 5, "the launch row to go")
        await pilot.pause()
        assert cursor_run(app) == killed and t.cursor_row == index_before
        await pilot.press("r")  # a rerun is a run just launched: the cursor goes to it
        await pilot.pause()
        rerun = [j for j in app.ws.runner.jobs.values() if not j.spec.resume][0]
        await until(pilot, lambda: cursor_run(app) == f"job:{rerun.id}", 5, "the cursor on the rerun")
        await pilot.press("k")  # the next k acts on the run under the cursor: the rerun, after asking
        assert isinstance(app.screen, ConfirmScreen) and "(rerun)" in app.screen.message
        await pilot.press("n")


async def test_kill_asks_first_and_can_be_told_not_to(demo, monkeypatch):
    app = demo_app(demo)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("l", "ctrl+l")  # a launch that stays starting (the stand-in engine sleeps)
        await until(pilot, lambda: any(j.state == "starting" for j in app.ws.runner.jobs.values()), 10, "start")
        job = next(iter(app.ws.runner.jobs.values()))
        assert cursor_run(app) == f"job:{job.id}"
        await pilot.press("k")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert job.state == "starting"
        app.confirm_prompts = False  # BCDTUI_CONFIRM=0 or --no-confirm
        await pilot.press("k")
        assert isinstance(app.screen, RunsScreen)
        await until(pilot, lambda: job.state in ("error", "exited"), 10, "the kill")
    monkeypatch.setenv("BCDTUI_CONFIRM", "0")
    assert demo_app(demo).confirm_prompts is False


async def test_u_on_a_finished_run_and_k_on_an_ended_one_are_refused(demo):
    app = demo_app(demo)
    notes = collect_notes(app)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause()
        cursor_to(app, "quickstart-20261126-025404-92c6eb")
        await pilot.press("u", "k")
        await pilot.pause()
        assert app.ws.runner.jobs == {} and isinstance(app.screen, RunsScreen)
        assert any("finished: nothing to resume" in n for n in notes), notes
        assert any("finished, not running: nothing to kill" in n for n in notes), notes


async def test_unsaved_editor_text_asks_before_quit(demo):
    app = demo_app(demo)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("f3")
        await pilot.pause(0.3)
        await pilot.press("enter")  # edit the highlighted recipe
        await pilot.press("x")
        screen = app.screen
        assert screen.dirty
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, ConfirmScreen) and "unsaved" in app.screen.message
        await pilot.press("n")
        assert app.is_running and app.screen is screen
        await pilot.press("ctrl+q", "y")
        await pilot.pause()
        assert not app.is_running
    assert (demo / "recipes" / "tiny.toml").read_text() == TINY


async def test_tab_in_the_editor_moves_focus_as_the_help_says(demo):
    app = demo_app(demo)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("f3")
        await pilot.pause(0.3)
        await pilot.press("enter")
        editor = app.screen.query_one("#editor")
        assert editor.has_focus
        await pilot.press("tab")
        assert not editor.has_focus and editor.text == TINY
        from bcdtui.app import key_sections
        from bcdtui.keymap import key_map
        recipes = dict(key_map(key_sections()))["Recipes (F3 or e)"]
        assert any(k == "tab" and "move focus" in what for k, what in recipes)


async def test_launch_dialog_refuses_a_recipe_whose_data_files_are_missing(demo):
    data = demo / "data"
    data.mkdir()
    text = TINY.replace('name = "digits_flat"', f'name = "mnist_flat"\nroot = "{data}"')
    assert text != TINY
    (demo / "recipes" / "tiny.toml").write_text(text)
    app = demo_app(demo)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("l")
        plan = str(app.screen.query_one("#plan").render())
        assert plan.startswith("✗") and "MNIST" in plan and "missing" in plan, plan
        await pilot.press("ctrl+l")
        assert app.ws.runner.jobs == {}
        (data / "MNIST").mkdir()  # the files' folder is there: the dialog ticks it
        app.screen.update_plan()
        assert str(app.screen.query_one("#plan").render()).startswith("✓")


async def test_a_launch_error_shows_in_its_row_and_on_its_run_screen(demo):
    (demo / "recipes" / "tiny.toml").write_text(TINY + "\n# broken on purpose\n")
    app = demo_app(demo)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("l", "ctrl+l")
        job = next(iter(app.ws.runner.jobs.values()))
        await until(pilot, lambda: job.state == "error", 15, "the engine's refusal")
        await pilot.pause(0.3)
        cell = table(app).get_cell(f"job:{job.id}", "state").plain
        assert cell.startswith("error: tiny.toml:1: [run] broken: refused"), cell
        assert cursor_run(app) == f"job:{job.id}"
        await pilot.press("enter")
        from bcdtui.screens import RunScreen
        assert isinstance(app.screen, RunScreen)
        text = screen_text(app)
        assert "refused by the engine on purpose" in " ".join(text.split()), text


async def test_sweep_preview_says_how_many_more_at_80x24(demo):
    (demo / "recipes" / "tiny.toml").write_text(TINY + '\n[sweep]\n"run.seed" = [0, 1, 2, 3, 4, 5, 6, 7]\n')
    app = demo_app(demo)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("l")
        await pilot.pause()
        text = screen_text(app)
        assert "8 runs" in text and "and 3 more" in text, text


async def test_l_preselects_the_highlighted_runs_recipe(demo):
    from bcdtui.recipes import TEMPLATE
    for name in ("aaa_first", "quickstart"):
        (demo / "recipes" / f"{name}.toml").write_text(TEMPLATE.format(name=name))
    app = demo_app(demo)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause()
        cursor_to(app, "quickstart-20261126-031010-4be1a0")
        await pilot.press("l")
        assert Path(app.screen.query_one("#recipe").value).name == "quickstart.toml"
        await pilot.press("escape")
        cursor_to(app, "tiny-20261126-043000-deadbe")
        await pilot.press("l")
        assert Path(app.screen.query_one("#recipe").value).name == "tiny.toml"


# ----------------------------------------------------------------------------------------------------------
# the new keys

async def test_annotate_then_filter_by_tag_and_state(demo):
    app = demo_app(demo)
    run_id = "quickstart-20261126-025404-92c6eb"
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause()
        t = table(app)
        cursor_to(app, run_id)
        await pilot.press("a", *"lr-0.05", "tab", *"baseline best", "ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, RunsScreen)
        assert t.get_cell(run_id, "run").plain == "lr-0.05-92c6eb"
        assert t.get_cell(run_id, "tags").plain == "baseline best"
        stored = (demo / "runs" / run_id / "annotations.json").read_text()
        assert '"baseline"' in stored and '"lr-0.05"' in stored
        await pilot.press("slash", *"tag:baseline")
        await pilot.pause()
        assert real_runs(app) == [run_id]
        app.runs_screen.query_one("#filter").value = "state:finished"
        await pilot.pause()
        assert set(real_runs(app)) == {run_id, "quickstart-20261126-031010-4be1a0"}
        app.runs_screen.query_one("#filter").value = "tag:nothing-has-it"
        await pilot.pause()
        assert real_runs(app) == []
        # a bad tag is refused in the dialog, in one line, and nothing is stored
        app.runs_screen.query_one("#filter").value = ""
        await pilot.press("escape")
        cursor_to(app, run_id)
        await pilot.press("a", "tab", *" bad,tag!", "ctrl+s")
        await pilot.pause()
        assert "tag 'tag!'" in str(app.screen.query_one("#annotate-error").render())
        await pilot.press("escape", "y")
        assert (demo / "runs" / run_id / "annotations.json").read_text() == stored


async def test_empty_state_says_what_to_press(place):
    app = make_app(place)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        text = screen_text(app)
        assert "No runs yet" in text and "launch a recipe" in text and "F3" in text


async def test_right_scrolls_one_whole_column(demo):
    app = demo_app(demo)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        t = table(app)
        starts = t.column_starts()
        await pilot.press("right")
        await pilot.pause()
        assert t.scroll_x == starts[1]  # the state column scrolled away whole; the run id stays
        await pilot.press("right", "left", "left")
        await pilot.pause()
        assert t.scroll_x == 0


async def test_run_screen_maximises_each_panel_in_turn(demo):
    app = demo_app(demo)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        cursor_to(app, "quickstart-20261126-025404-92c6eb")
        await pilot.press("enter")
        await pilot.pause()
        seen = []
        for _ in range(4):
            await pilot.press("z")
            await pilot.pause()
            seen.append(app.screen.maximized.id if app.screen.maximized is not None else None)
        assert seen == ["chart", "blocks", "side", None]


async def test_full_log_search_wrap_and_follow(demo):
    app = demo_app(demo)
    run_id = "sweep_k-20261126-040000-a1b2c3"
    log = demo / "runs" / run_id / "log.txt"
    log.write_text("".join(f"line {i} {'x' * 150 if i == 3 else ''}\n" for i in range(300)))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        cursor_to(app, run_id)
        await pilot.press("enter", "L")
        await pilot.pause(0.3)
        screen = app.screen
        view = screen.query_one("#full-log")
        assert view.scroll_y == view.max_scroll_y > 0  # follows: at the end
        await pilot.press("slash", *"line 42", "enter")
        await pilot.pause(0.3)
        assert screen.matched_line() == "line 42 " and not screen.following
        assert view.scroll_y <= 42 <= view.scroll_y + view.size.height
        with log.open("a") as f:
            f.write("a new line\n")
        await pilot.pause(0.5)
        assert screen.lines[-1] == "a new line" and view.scroll_y < view.max_scroll_y  # not following
        await pilot.press("f")
        await pilot.pause(0.3)
        assert screen.following and view.scroll_y == view.max_scroll_y
        height = len(view.lines)
        await pilot.press("w")
        await pilot.pause(0.3)
        assert screen.wrap and len(view.lines) > height  # line 3 wraps over several rows


async def test_config_columns_show_at_160_columns(demo):
    app = demo_app(demo)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        await pilot.press("o", *"algorithm.K algorithm.lambda", "enter")
        await pilot.pause()
        t = table(app)
        assert t.get_cell("quickstart-20261126-031010-4be1a0", "cfg:algorithm.K").plain == "5"
        assert t.get_cell("quickstart-20261126-025404-92c6eb", "cfg:algorithm.lambda").plain == "0.01"
    narrow = demo_app(demo)
    async with narrow.run_test(size=(80, 24)) as pilot:
        await pilot.press("o", *"algorithm.K", "enter")
        await pilot.pause()
        assert "cfg:algorithm.K" not in [str(k.value) for k in table(narrow).columns]
