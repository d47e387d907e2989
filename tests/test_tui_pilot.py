"""Pilot tests (App.run_test): the workstation driven by keys, with the real engine (`python -m bcdcore run`)
where the issue asks for it: launch a short recipe and see it finish, kill a running one, restart the app and
find a running run re-attached. The others use synthetic run directories (bcdtui.synthetic)."""
from __future__ import annotations

from conftest import line_of, tiny_recipe
from textual.widgets import DataTable, Input, Log, Static
from tui_tools import make_app, real_runs, shown_runs, until

from bcdtui.app import BcdApp
from bcdtui.screens import CompareScreen, ConfirmScreen, HelpScreen, LaunchScreen, RecipesScreen, RunScreen, RunsScreen
from bcdtui.synthetic import demo_runs, write_run
from bcdtui.widgets import HeatMap, KeyBar, LineChart, RecipeEditor, StatusLines

# gamma's key misspelt: the validation names its line and suggests "gamma"; typing the missing "m" fixes it
BROKEN = tiny_recipe(replace={"gamma = 1.0": "gama = 0.5"})
BROKEN_LINE = line_of(BROKEN, "gama = 0.5")


def table_text(app: BcdApp, run_id: str, column: str) -> str:
    table = app.runs_screen.query_one("#runs", DataTable)
    try:
        cell = table.get_cell(run_id, column)
    except Exception:  # noqa: BLE001 - row not (yet) in the table
        return ""
    return getattr(cell, "plain", str(cell))


def summary(screen) -> str:
    return "\n".join(line.plain for line in screen.query_one("#summary", StatusLines).text_lines)


async def move_to(pilot, app: BcdApp, run_id: str) -> None:
    table = app.runs_screen.query_one("#runs", DataTable)
    table.focus()
    table.move_cursor(row=table.get_row_index(run_id))
    await pilot.pause()


async def launch_endless_run(pilot, app: BcdApp) -> str:
    """Launch the tiny recipe with 100000 rounds (it runs until killed) from the launch dialog; its run id once
    its run directory shows up in the table."""
    await pilot.press("l")
    await pilot.click("#overrides")
    await pilot.press(*"run.rounds=100000")
    await pilot.press("ctrl+l")
    await until(pilot, lambda: len(real_runs(app)) == 1, 120, "the run directory")
    return real_runs(app)[0]


# ----------------------------------------------------------------------------------------------------------
# with the real engine

async def test_launch_a_real_recipe_and_see_it_finish(place):
    app = make_app(place)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("l")
        assert isinstance(app.screen, LaunchScreen)
        await until(pilot, lambda: "✓" in str(app.screen.query_one("#plan", Static).render()), 10, "the plan")
        await pilot.press("ctrl+l")
        assert isinstance(app.screen, RunsScreen)
        await until(pilot, lambda: len(real_runs(app)) == 1, 120, "the run directory")
        run_id = real_runs(app)[0]
        assert run_id.startswith("tiny-")
        await until(pilot, lambda: table_text(app, run_id, "state") == "finished", 120, "state finished")
        assert table_text(app, run_id, "round") == "3/3" and table_text(app, run_id, "train_loss")
        await move_to(pilot, app, run_id)
        await pilot.press("enter")
        assert isinstance(app.screen, RunScreen)
        await until(pilot, lambda: "finished" in summary(app.screen), 10,
                    "the run screen's status")
        assert len(app.screen.follower.columns["round"]) == 3
        await until(pilot, lambda: app.screen.query_one("#log", Log).line_count > 0, 10, "the log tail")


async def test_kill_a_running_run_and_see_killed(place):
    app = make_app(place)
    async with app.run_test(size=(120, 36)) as pilot:
        run_id = await launch_endless_run(pilot, app)
        await until(pilot, lambda: table_text(app, run_id, "state") == "running"
                    and app.ws.model.rows[run_id].round >= 1, 120, "a running round")
        await move_to(pilot, app, run_id)
        await pilot.press("enter")  # kill from the run screen
        assert isinstance(app.screen, RunScreen)
        await pilot.press("k", "y")  # k asks first, as d does
        await until(pilot, lambda: app.ws.model.rows[run_id].state == "killed", 60, "state killed")
        await until(pilot, lambda: "killed" in summary(app.screen), 10,
                    "killed on the run screen")
        await pilot.press("escape")
        await until(pilot, lambda: table_text(app, run_id, "state") == "killed", 10, "killed in the table")
        assert (place / "runs" / run_id / "checkpoint.pt").is_file()


async def test_restart_finds_a_running_run_reattached(place):
    first = make_app(place)
    async with first.run_test(size=(120, 36)) as pilot:
        run_id = await launch_endless_run(pilot, first)
        await until(pilot, lambda: first.ws.model.rows[run_id].state == "running", 120, "state running")
        await pilot.press("q")  # quit: the run keeps going
    lost = write_run(place / "runs", "old-20260101-000000-abcdef", state="running", rounds=10, done=3)
    second = make_app(place)
    async with second.run_test(size=(120, 36)) as pilot:
        await pilot.pause()
        assert table_text(second, run_id, "state") == "running"  # re-attached at the first paint
        assert table_text(second, lost.name, "state") == "lost"  # died without an end event
        assert second.ws.runner.jobs == {}  # known through its run directory only
        round_then = second.ws.model.rows[run_id].round
        await until(pilot, lambda: second.ws.model.rows[run_id].round > round_then, 60, "live progress")
        await move_to(pilot, second, run_id)
        await pilot.press("k", "y")
        await until(pilot, lambda: table_text(second, run_id, "state") == "killed", 60, "killed after re-attach")


# ----------------------------------------------------------------------------------------------------------
# recipes

async def test_a_broken_recipe_shows_its_validation_error(place):
    (place / "recipes" / "broken.toml").write_text(BROKEN)
    app = make_app(place)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f3")
        assert isinstance(app.screen, RecipesScreen)
        screen = app.screen
        validation = screen.query_one("#validation", Static)
        editor = screen.query_one("#editor", RecipeEditor)
        await until(pilot, lambda: "broken.toml" in str(validation.render()), 10, "the broken recipe")
        message = str(validation.render())
        assert f"broken.toml:{BROKEN_LINE}:" in message and "gamma" in message  # file:line, did you mean
        assert editor.error_line == BROKEN_LINE
        # the launch dialog refuses it with the same line
        await pilot.press("ctrl+l")
        assert isinstance(app.screen, LaunchScreen)
        assert f"broken.toml:{BROKEN_LINE}:" in str(app.screen.query_one("#plan", Static).render())
        await pilot.press("ctrl+l")
        assert isinstance(app.screen, LaunchScreen) and app.ws.runner.jobs == {}
        await pilot.press("escape")
        # fix it by typing: "gama" -> "gamma"
        await pilot.press("enter")
        assert editor.has_focus
        editor.cursor_location = (BROKEN_LINE - 1, 2)
        await pilot.press("m")
        await until(pilot, lambda: str(validation.render()).startswith("✓"), 10, "the fixed recipe to validate")
        assert editor.error_line is None and "modified" in editor.border_title
        await pilot.press("ctrl+s")
        assert "gamma = 0.5" in (place / "recipes" / "broken.toml").read_text()
        assert "modified" not in editor.border_title
        # a syntax error points at its line too
        editor.cursor_location = (1, 0)
        await pilot.press("=")
        await until(pilot, lambda: "not valid TOML" in str(validation.render()), 10, "the TOML error")
        assert editor.error_line == 2


async def test_new_recipe_from_template_and_sweep_preview(place):
    app = make_app(place)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f3", "ctrl+n")
        await pilot.press(*"grid", "enter")
        path = place / "recipes" / "grid.toml"
        assert path.is_file() and app.screen.path == path
        editor = app.screen.query_one("#editor", RecipeEditor)
        assert editor.has_focus
        editor.move_cursor(editor.document.end)
        await pilot.press("enter", *'[sweep]', "enter", *'"run.seed" = [0, 1, 2]')
        validation = app.screen.query_one("#validation", Static)
        await until(pilot, lambda: "sweep of 3 runs" in str(validation.render()), 10, "the sweep summary")
        await pilot.press("ctrl+l")  # saves, then opens the launch dialog with this recipe
        assert isinstance(app.screen, LaunchScreen)
        plan = str(app.screen.query_one("#plan", Static).render())
        assert "3 runs: 2 start now, 1 waits in the queue" in plan and "run.seed=2" in plan
        await pilot.press("escape")
        assert "[sweep]" in path.read_text()


# ----------------------------------------------------------------------------------------------------------
# runs table, run screen, compare (synthetic run directories)

async def test_compare_two_runs_shows_recipe_differences(place):
    demo_runs(place / "runs")
    app = make_app(place)
    async with app.run_test(size=(120, 36)) as pilot:
        a, b = "quickstart-20261126-025404-92c6eb", "quickstart-20261126-031010-4be1a0"
        await move_to(pilot, app, a)
        await pilot.press("space")
        await move_to(pilot, app, b)
        await pilot.press("space", "c")
        assert isinstance(app.screen, CompareScreen)
        diff = app.screen.query_one("#diff", DataTable)
        rows = {str(diff.get_row_at(i)[0]): [str(c) for c in diff.get_row_at(i)[1:]] for i in range(diff.row_count)}
        assert rows["algorithm.K"] == ["10", "5"]
        assert rows["algorithm.lambda"] == ["0.01", "0.05"]
        assert rows["run.seed"] == ["0", "1"]
        assert "run.name" not in rows  # differences only
        assert len(app.screen.query_one("#cmp-chart", LineChart).series) == 2
        await pilot.press("d")
        assert diff.row_count > len(rows)
        names = [str(diff.get_row_at(i)[0]) for i in range(diff.row_count)]
        assert "run.name" in names
        await pilot.press("y", "x", "g")
        assert app.screen.metric == "val_loss" and app.screen.x_axis == "grad_evals" and app.screen.log_y
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_runs_table_filter_sort_and_delete_with_confirmation(place):
    demo_runs(place / "runs")
    app = make_app(place)
    async with app.run_test(size=(80, 24)) as pilot:
        assert len(shown_runs(app)) == 6
        await pilot.press("slash", *"diabetes")
        assert shown_runs(app) == ["diabetes-20261126-041500-77aa01"]
        await pilot.press("escape")
        assert len(shown_runs(app)) == 6 and not app.runs_screen.query_one("#filter", Input).value
        await pilot.press("f")  # active
        assert shown_runs(app) == ["sweep_k-20261126-040000-a1b2c3"]
        await pilot.press("f", "f", "f")  # finished, problems, all
        assert len(shown_runs(app)) == 6
        await pilot.press("s", "s")  # started -> recipe -> run
        assert app.ws.model.sort_column == "run" and not app.ws.model.sort_reverse
        assert shown_runs(app) == sorted(shown_runs(app))
        await pilot.press("S")
        assert shown_runs(app) == sorted(shown_runs(app), reverse=True)
        victim = "diabetes-20261126-041500-77aa01"
        await move_to(pilot, app, victim)
        await pilot.press("d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert (place / "runs" / victim).is_dir()
        await pilot.press("d")
        await pilot.press("y")
        await until(pilot, lambda: victim not in shown_runs(app), 10, "the deleted row to go")
        assert not (place / "runs" / victim).exists()
        await move_to(pilot, app, "quickstart-20261126-025404-92c6eb")
        await pilot.press("k")  # a finished run: refused with a message, nothing breaks
        assert isinstance(app.screen, RunsScreen)


async def test_run_screen_chart_axes_blocks_and_heat_map(place):
    demo_runs(place / "runs")
    app = make_app(place)
    async with app.run_test(size=(120, 40)) as pilot:
        run_id = "quickstart-20261126-025404-92c6eb"
        await move_to(pilot, app, run_id)
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, RunScreen)
        chart = screen.query_one("#chart", LineChart)
        assert chart.series[0].label == "train_loss" and len(chart.series[0].xs) == 30
        blocks = screen.query_one("#blocks", DataTable)
        assert blocks.row_count == 2 and "round 30" in blocks.border_title
        await pilot.press("x")
        assert screen.x_axis == "grad_evals" and chart.series[0].xs[-1] == 600
        await pilot.press("y", "y")
        assert screen.metric == "val_acc"
        await pilot.press("m")
        assert screen.panel == "block_coupling"
        heat = screen.query_one("#measures", HeatMap)
        assert heat.matrix is not None and len(heat.matrix) == 8 and heat.display
        # live: a new metric line shows up without reopening
        path = place / "runs" / run_id / "metrics.jsonl"
        with open(path, "a") as f:
            f.write('{"v": 1, "kind": "metric", "t": 1795000020.0, "round": 31, "grad_evals": 620, '
                    '"train_loss": 0.01, "val_loss": 0.02, "val_acc": 0.995}\n')
        await until(pilot, lambda: len(chart.series[0].xs) == 31, 5, "the appended metric line")


async def test_keys_help_palette_and_80x24(place):
    demo_runs(place / "runs")
    app = make_app(place)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        keys = app.runs_screen.query_one(KeyBar).entries()
        shown = {desc for _k, desc, _e in keys}
        for action in ("Open", "Launch", "Kill", "Rerun", "Resume", "Delete", "Mark", "Compare", "Filter",
                       "States", "Sort", "Reverse", "Quit", "Help", "Runs", "Recipes", "palette"):
            assert action in shown, action
        bar = app.runs_screen.query_one(KeyBar)
        assert bar.region.height >= 2 and bar.region.bottom == 24  # wrapped, fully on screen at 80x24
        commands = [c.title for c in app.get_system_commands(app.screen)]
        for title in ("Open", "Launch", "Kill", "Compare", "Help", "Recipes"):
            assert title in commands
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        assert "SIGTERM" in app.export_screenshot()  # the kill key's line, visible at 80x24
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("ctrl+p")
        await pilot.press(*"recipes")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, RecipesScreen), 5, "the palette to open recipes")
        await pilot.press("f2")
        assert isinstance(app.screen, RunsScreen)


async def test_quit_with_a_queued_launch_asks_and_keeps_the_queue(place):
    from bcdtui.runner import Slot

    app = make_app(place, slots=[Slot("gpu0", "0: none here", "0")], per_slot=1)
    app.ws.runner.per_slot = 0  # no room anywhere: the launch stays queued
    async with app.run_test(size=(100, 30)) as pilot:
        jobs = app.ws.launch(place / "recipes" / "tiny.toml")
        await until(pilot, lambda: f"job:{jobs[0].id}" in shown_runs(app), 5, "the queued row")
        assert table_text(app, f"job:{jobs[0].id}", "state") == "queued"
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("ctrl+q", "y")
    assert (place / "runs" / ".bcdtui" / "queue.json").read_text().count(jobs[0].id) == 1
