"""Snapshot tests (pytest-textual-snapshot) of every screen at 80x24 and 160x48, over the fixed synthetic runs
of bcdtui.synthetic.demo_runs. Update after an intended change with `pytest tests/test_tui_snapshots.py
--snapshot-update` and look at the SVGs (the README shows one as the screenshot)."""
from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Select
from tui_tools import cursor_to

from bcdtui.app import BcdApp
from bcdtui.recipes import TEMPLATE
from bcdtui.runner import Slot
from bcdtui.synthetic import demo_runs

pytest.importorskip("pytest_textual_snapshot")

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((160, 48), id="160x48")]
BROKEN = TEMPLATE.format(name="broken").replace("K = 10", "K = 10\ngama = 0.5")
SWEEP = TEMPLATE.format(name="lr_grid") + '\n[sweep]\n"algorithm.lr" = [0.01, 0.05, 0.1]\n"run.seed" = [0, 1]\n'


@pytest.fixture
def app(tmp_path, monkeypatch):
    """The app over a fixed set of runs and recipes, with relative paths and a fixed slot so that nothing in
    the picture depends on the machine or the temporary directory."""
    monkeypatch.chdir(tmp_path)
    demo_runs(tmp_path / "runs")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "broken.toml").write_text(BROKEN)
    (recipes / "lr_grid.toml").write_text(SWEEP)
    (recipes / "quickstart.toml").write_text(TEMPLATE.format(name="quickstart"))
    return BcdApp(Path("runs"), Path("recipes"), slots=[Slot("cpu", "CPU", "")], refresh_s=0.25)


@pytest.fixture(params=SIZES)
def snap(snap_compare, app, request):
    """snap(run_before=None): whether `app` at this test's terminal size, after `await run_before(pilot)`,
    matches the snapshot named after the test and its size."""

    def compare(run_before=None) -> bool:
        return snap_compare(app, terminal_size=request.param, run_before=run_before)

    return compare


QUICKSTART = "quickstart-20261126-025404-92c6eb"


async def _open(pilot, run_id: str) -> None:
    await pilot.pause()
    cursor_to(pilot.app, run_id)
    await pilot.press("enter")
    await pilot.pause()


def _after_keys(*keys: str, settle: float | None = None):
    """A run_before for the screens one key opens: the first paint, `keys`, then `settle` seconds if given."""

    async def run_before(pilot) -> None:
        await pilot.pause()
        await pilot.press(*keys)
        if settle is not None:
            await pilot.pause(settle)

    return run_before


def test_runs_screen(snap):
    assert snap()


def test_run_screen(snap):
    async def run_before(pilot):
        await _open(pilot, QUICKSTART)

    assert snap(run_before)


def test_run_screen_heat_map(snap):
    async def run_before(pilot):
        await _open(pilot, QUICKSTART)
        await pilot.press("y", "m")

    assert snap(run_before)


def test_compare_screen(snap):
    async def run_before(pilot):
        await pilot.pause()
        for run_id in (QUICKSTART, "quickstart-20261126-031010-4be1a0"):
            cursor_to(pilot.app, run_id)
            await pilot.press("space")
        await pilot.press("c")
        await pilot.pause()

    assert snap(run_before)


def test_recipes_screen_with_validation_error(snap):
    assert snap(_after_keys("f3", settle=0.3))  # the validation runs after a short debounce


def test_launch_dialog_with_sweep_preview(snap):
    async def run_before(pilot):
        await pilot.pause()
        await pilot.press("l")
        await pilot.pause()
        pilot.app.screen.query_one("#recipe", Select).value = Path("recipes/lr_grid.toml")
        await pilot.pause()

    assert snap(run_before)


def test_help_screen(snap):
    assert snap(_after_keys("f1"))


def test_delete_confirmation(snap):
    async def run_before(pilot):
        await pilot.pause()
        cursor_to(pilot.app, "diabetes-20261126-041500-77aa01")
        await pilot.press("d")
        await pilot.pause()

    assert snap(run_before)


# ----------------------------------------------------------------------------------------------------------
# issue 13: the first start, the column scroll, annotations, config columns, a maximised panel, the full log

@pytest.mark.parametrize("size", SIZES)
def test_empty_state(snap_compare, tmp_path, monkeypatch, size):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    app = BcdApp(Path("runs"), Path("recipes"), slots=[Slot("cpu", "CPU", "")], refresh_s=0.25)
    assert snap_compare(app, terminal_size=size)


def test_runs_screen_scrolled_two_columns(snap):
    assert snap(_after_keys("right", "right"))


def test_annotate_dialog(snap):
    async def run_before(pilot):
        await pilot.pause()
        cursor_to(pilot.app, QUICKSTART)
        await pilot.press("a", *"lr-0.05", "tab", *"baseline best", "tab", *"the reference run")
        await pilot.pause()

    assert snap(run_before)


def test_runs_screen_with_annotations_and_config_columns(snap):
    async def run_before(pilot):
        await pilot.pause()
        cursor_to(pilot.app, QUICKSTART)
        await pilot.press("a", *"lr-0.05", "tab", *"baseline", "ctrl+s")
        await pilot.press("o", *"algorithm.K algorithm.lambda", "enter")
        await pilot.pause()

    assert snap(run_before)


def test_run_screen_maximised_chart(snap):
    async def run_before(pilot):
        await _open(pilot, QUICKSTART)
        await pilot.press("z")
        await pilot.pause()

    assert snap(run_before)


def test_full_log_with_search(snap):
    async def run_before(pilot):
        await _open(pilot, QUICKSTART)
        await pilot.press("L")
        await pilot.pause()
        await pilot.press("slash", *"round 2", "enter")
        await pilot.pause()

    assert snap(run_before)
