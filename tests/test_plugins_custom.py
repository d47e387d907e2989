"""examples/custom, the user package outside bcdcore (a model with blocks, a dataset, a solver, a stopper):
run by `bcdcore run`, by a sweep (then one plot of blockwise against entire), on two ranks, and launched
from bcdtui, which finds the package with --plugins DIR."""
from __future__ import annotations

import os

import pytest
from conftest import REPO, cli_env, run_cli
from textual.widgets import Static
from tui_tools import until

from bcdcore.api import load_run
from bcdcore.rundir import list_runs, read_events

CUSTOM = REPO / "examples" / "custom"


def test_custom_recipe_runs_from_the_cli_with_plugins_dir(tmp_path):
    done = run_cli("--plugins", CUSTOM, "run", CUSTOM / "custom.toml", "--set", "run.rounds=6", "--set",
                   "model.args.depth=3", "--runs-dir", tmp_path / "runs", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = load_run(list_runs(tmp_path / "runs")[0])
    assert run.state == "finished" and run.recipe.model.args == {"depth": 3, "width": 32}
    start = next(e for e in read_events(run.path) if e["kind"] == "start")
    assert start["n_blocks"] == 4  # depth 3 hidden layers + the output layer, one block each
    assert start["block_sizes"] == [8 * 32 + 32, 32 * 32 + 32, 32 * 32 + 32, 32 * 3 + 3]
    losses = run.history["train_loss"]
    assert losses[-1] < losses[0]  # Lion on the spirals learns
    exported = run_cli("--plugins", CUSTOM, "export", run.path, "--onnx", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert (run.path / "model.onnx").stat().st_size > 1000
    # without the folder on the path: one line, exit 2, nothing written
    lost = run_cli("run", CUSTOM / "custom.toml", "--runs-dir", tmp_path / "lost", cwd=tmp_path)
    assert lost.returncode == 2 and lost.stderr.count("\n") == 1 and "cannot import module 'mypkg" in lost.stderr
    assert not (tmp_path / "lost").exists()


def test_custom_recipe_through_the_python_api_gives_the_cli_numbers(tmp_path, monkeypatch, capsys):
    """The same recipe and seed through bcdcore.train and through `bcdcore run` (in process): the same numbers."""
    import sys

    import numpy as np

    import bcdcore
    from bcdcore.cli import main

    monkeypatch.setattr(sys, "path", [str(CUSTOM), *sys.path])
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    api = bcdcore.train(CUSTOM / "custom.toml", runs_dir=tmp_path / "api", overrides=["run.rounds=5"])
    assert main(["run", str(CUSTOM / "custom.toml"), "--set", "run.rounds=5", "--runs-dir", str(tmp_path / "cli"),
                 "--quiet"]) == 0
    capsys.readouterr()
    cli = bcdcore.load_run(list_runs(tmp_path / "cli")[0])
    assert api.state == cli.state == "finished" and api.recipe.algorithm.solver == "mypkg.opt:Lion"
    np.testing.assert_array_equal(api.history["train_loss"], cli.history["train_loss"])
    assert api.final["test_acc"] == cli.final["test_acc"] and len(api.history["round"]) == 5


@pytest.mark.slow
def test_custom_sweep_compares_blockwise_and_entire_in_one_plot(tmp_path):
    done = run_cli("--plugins", CUSTOM, "sweep", CUSTOM / "compare.toml", "--set", "run.rounds=3", "--per-gpu", "2",
                   "--runs-dir", tmp_path / "runs", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_dir = next((tmp_path / "runs").iterdir())
    runs = list_runs(sweep_dir)
    assert len(runs) == 4
    recipes = [load_run(r).recipe for r in runs]
    assert sorted((r.algorithm.mode, r.model.args["depth"]) for r in recipes) == [
        ("blockwise", 2), ("blockwise", 3), ("entire", 2), ("entire", 3)]
    from bcdtui.diff import diff_runs

    # the TUI's recipe diff of the four runs: exactly the swept keys, the plugin's argument by its dotted name
    assert {row.key for row in diff_runs(runs, only_differences=True)} == {"algorithm.mode", "model.args.depth"}
    out = tmp_path / "compare.png"
    plot = run_cli("plot", *runs, "--y", "val_loss", "--out", out, cwd=tmp_path)
    assert plot.returncode == 0, plot.stderr
    assert out.stat().st_size > 10_000


@pytest.mark.slow
def test_custom_model_on_two_ranks(tmp_path):
    """Spawned ranks import the plugin: the launcher hands its sys.path additions on through PYTHONPATH."""
    env = cli_env()
    env["PYTHONPATH"] = str(REPO)  # the plugin folder only through --plugins
    (tmp_path / "two.toml").write_text((CUSTOM / "custom.toml").read_text().replace("rounds = 30", "rounds = 3")
                                       + "\n[distributed]\nnproc = 2\ntimeout_s = 120\n")
    done = run_cli("--plugins", CUSTOM, "run", "two.toml", "--runs-dir", tmp_path / "runs", "--quiet",
                   cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    run = load_run(list_runs(tmp_path / "runs")[0])
    assert run.state == "finished" and len(run.history["round"]) == 3


async def test_custom_recipe_launched_from_the_tui(tmp_path, monkeypatch):
    from bcdtui.app import BcdApp
    from bcdtui.recipes import add_plugin_dirs
    from bcdtui.runner import cpu_slot

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "custom.toml").write_text((CUSTOM / "custom.toml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("BCD_RUNS", raising=False)
    app = BcdApp(tmp_path / "runs", recipes, slots=[cpu_slot()], per_slot=1, refresh_s=0.1)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("l")
        await until(pilot, lambda: "package 'mypkg' not found" in plan_text(app), 10, "the missing plugin")
        await pilot.press("escape")
        add_plugin_dirs([CUSTOM])  # what `bcdtui --plugins examples/custom` does
        assert str(CUSTOM) in os.environ["PYTHONPATH"].split(os.pathsep)
        await pilot.press("l")
        await pilot.click("#overrides")
        await pilot.press(*"run.rounds=3")
        await until(pilot, lambda: "plugins: mypkg" in plan_text(app), 10, "the plan naming the plugin")
        await pilot.press("ctrl+l")
        await until(pilot, lambda: len(list_runs(tmp_path / "runs")) == 1, 120, "the run directory")
        path = list_runs(tmp_path / "runs")[0]
        await until(pilot, lambda: load_run(path).state == "finished", 180, "the run to finish")
    run = load_run(path)
    assert run.recipe.algorithm.solver == "mypkg.opt:Lion" and len(run.history["round"]) == 3


def plan_text(app) -> str:
    try:
        return str(app.screen.query_one("#plan", Static).render())
    except Exception:  # noqa: BLE001 - the dialog is not (yet) open
        return ""
