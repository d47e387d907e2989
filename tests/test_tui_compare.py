"""The compare screen (issue 13 item 3): its plain logic (EMA, summary rows, grid metrics, legend names from the
recipe diff, the `bcdcore plot` command) without a terminal, `bcdcore plot --smooth`, and pilot tests of the
keys (s / S smoothing, v grid, p PNG) over synthetic run directories."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from hypothesis import given
from hypothesis import strategies as st
from textual.widgets import DataTable, Static

from bcdcore.plot import ema as plot_ema
from bcdtui.app import BcdApp
from bcdtui.charts import PALETTE, Series, faded, line_chart
from bcdtui.compare import (
    SMOOTHING,
    chart_series,
    ema,
    grid_metrics,
    higher_is_better,
    next_smoothing,
    plot_command,
    plot_path,
    run_plot,
    summary_metrics,
    summary_rows,
)
from bcdtui.diff import legend_names, recipe_diff
from bcdtui.runner import cpu_slot
from bcdtui.screens import CompareScreen
from bcdtui.synthetic import demo_runs, resolved_recipe, write_run
from bcdtui.tailer import RunFollower

A, B = "quickstart-20261126-025404-92c6eb", "quickstart-20261126-031010-4be1a0"


# ----------------------------------------------------------------------------------------------------------
# EMA

def test_ema_numbers_and_edges():
    assert ema([1.0, 2.0, 3.0], 0.5) == [1.0, 1.5, 2.25]
    assert ema([4.0, 0.0], 0.9) == [4.0, pytest.approx(3.6)]
    assert ema([1.0, 5.0, 2.0], 0.0) == [1.0, 5.0, 2.0]  # factor 0: the raw curve
    out = ema([math.nan, 2.0, math.inf, 4.0], 0.5)  # non-finite values pass through, outside the average
    assert math.isnan(out[0]) and out[1] == 2.0 and out[2] == math.inf and out[3] == 3.0
    assert ema([], 0.9) == []
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="0 <= factor < 1"):
            ema([1.0], bad)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60), st.sampled_from(SMOOTHING))
def test_ema_stays_within_the_data_and_matches_bcdcore_plot(values, factor):
    out = ema(values, factor)
    assert len(out) == len(values)
    assert min(values) - 1e-6 <= min(out) and max(out) <= max(values) + 1e-6
    assert out[0] == values[0]
    np.testing.assert_allclose(plot_ema(np.array(values), factor), out, rtol=1e-12, atol=1e-9)


def test_smoothing_key_steps_through_the_factors_and_wraps():
    seen, factor = [], 0.0
    for _ in range(len(SMOOTHING)):
        factor = next_smoothing(factor)
        seen.append(factor)
    assert seen == [*SMOOTHING[1:], 0.0]
    assert next_smoothing(0.0, -1) == SMOOTHING[-1]
    assert next_smoothing(0.9, -1) == 0.8


# ----------------------------------------------------------------------------------------------------------
# summary table

def test_summary_rows_final_best_test_evals_wall():
    a = {"round": [1, 2, 3], "train_loss": [2.0, 0.5, 0.7], "val_acc": [0.5, 0.9, 0.8], "grad_evals": [10, 20, 30],
         "wall_s": [1.0, 2.0, 95.0], "test_acc": [math.nan, math.nan, 0.85]}
    b = {"round": [1, 2], "train_loss": [1.0, 0.6], "val_acc": [0.6, math.nan], "grad_evals": [5, 1500]}
    rows = summary_rows([a, b], summary_metrics(["train_loss", "val_acc", "test_acc", "grad_evals"]),
                        wall_fallback=[math.nan, 7200.0])
    got = {r.label: r for r in rows}
    assert [r.label for r in rows] == ["train_loss final", "train_loss best", "val_acc final", "val_acc best",
                                       "test_acc", "grad_evals", "wall time"]
    assert got["train_loss final"].values == [0.7, 0.6] and got["train_loss final"].best == 1
    assert got["train_loss best"].values == [0.5, 0.6] and got["train_loss best"].best == 0  # min for a loss
    assert got["val_acc final"].values == [0.8, 0.6] and got["val_acc final"].best == 0  # last finite value
    assert got["val_acc best"].values == [0.9, 0.6] and got["val_acc best"].best == 0  # max for an accuracy
    assert got["test_acc"].values[0] == 0.85 and math.isnan(got["test_acc"].values[1])
    assert got["test_acc"].best is None  # one run has it: nothing to compare
    assert got["grad_evals"].cells() == ["grad_evals", "30", "1,500"]
    assert got["wall time"].cells() == ["wall time", "1m35s", "2h00m"]  # b has no wall_s: ended - started
    assert got["train_loss final"].cells() == ["train_loss final", "0.7", "0.6"]


def test_summary_ties_and_empty_runs_mark_no_best():
    rows = summary_rows([{"train_loss": [1.0]}, {"train_loss": [1.0]}, {}], ["train_loss"])
    assert rows[0].best is None and math.isnan(rows[0].values[2]) and rows[0].cells()[3] == "—"
    assert higher_is_better("val_acc") and higher_is_better("test_f1") and not higher_is_better("val_loss")


def test_grid_metrics_start_at_the_chart_metric_and_leave_out_test_ones():
    names = ["train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "grad_norm", "residual"]
    assert grid_metrics(names, "train_loss") == ["train_loss", "val_loss", "val_acc", "grad_norm"]
    assert grid_metrics(names, "residual") == ["residual", "train_loss", "val_loss", "val_acc"]
    assert grid_metrics(["test_acc"], "test_acc") == ["test_acc"]


# ----------------------------------------------------------------------------------------------------------
# legends from the recipe diff

def _recipe(name, seed, **algorithm):
    return {"run": {"name": name, "seed": seed}, "algorithm": {"K": 10, "lambda": 0.01, **algorithm},
            "stop": [{"kind": "rounds", "value": 5}]}


def test_legend_names_use_the_keys_that_differ_seed_last_never_the_name():
    rows = recipe_diff([_recipe("a", 0, K=10, **{"lambda": 0.1}), _recipe("b", 1, K=5, **{"lambda": 0.1})])
    assert legend_names(rows, ["a-1", "b-2"]) == ["K=10 seed=0", "K=5 seed=1"]
    assert legend_names(rows, ["a-1", "b-2"], max_keys=1) == ["K=10", "K=5"]


def test_legend_names_fall_back_to_the_short_id_when_nothing_tells_runs_apart():
    same = recipe_diff([_recipe("a", 0), _recipe("a", 0)])
    assert legend_names(same, ["a-1", "a-2"]) == ["a-1", "a-2"]
    # three runs, one key shown: two share a label, so those two carry their ids
    rows = recipe_diff([_recipe("a", 0, K=1, gamma=1), _recipe("a", 0, K=1, gamma=2), _recipe("a", 0, K=2)])
    assert legend_names(rows, ["x", "y", "z"], max_keys=1) == ["K=1 (x)", "K=1 (y)", "K=2"]


def test_legend_names_full_key_when_short_names_clash_and_lists_only_as_a_last_resort():
    rows = recipe_diff([{"data": {"seed": 1}, "run": {"seed": 0}}, {"data": {"seed": 2}, "run": {"seed": 3}}])
    assert legend_names(rows, ["x", "y"]) == ["data.seed=1 run.seed=0", "data.seed=2 run.seed=3"]
    stops = recipe_diff([{"stop": [{"kind": "rounds"}]}, {"stop": [{"kind": "time"}]}])
    assert legend_names(stops, ["x", "y"]) == ['kind="rounds"', 'kind="time"']


# ----------------------------------------------------------------------------------------------------------
# chart series and legend

def test_smoothed_series_keep_the_raw_curves_faded_and_unnamed():
    curves = [([1, 2, 3], [3.0, 1.0, 2.0]), ([1, 2], [5.0, 4.0])]
    raw = chart_series(curves, ["K=1", "K=2"], 0.0)
    assert [(s.label, s.ys, s.color) for s in raw] == [("K=1", [3.0, 1.0, 2.0], PALETTE[0]),
                                                       ("K=2", [5.0, 4.0], PALETTE[1])]
    smooth = chart_series(curves, ["K=1", "K=2"], 0.5)
    assert [s.label for s in smooth] == ["", "", "K=1", "K=2"]
    assert smooth[0].ys == [3.0, 1.0, 2.0] and smooth[0].color == faded(PALETTE[0])  # the data, unchanged
    assert smooth[2].ys == [3.0, 2.0, 2.0] and smooth[3].ys == [5.0, 4.5]
    assert faded("#ff8040", 0.5) == "#804020" and faded("red") == "red"


def test_chart_legend_names_labelled_series_only():
    lines = line_chart([Series("", [1, 2], [1, 2]), Series("K=5 lambda=0.05", [1, 2], [2, 1])], 60, 10)
    assert lines[-1].plain.strip() == "━ K=5 lambda=0.05"


# ----------------------------------------------------------------------------------------------------------
# p: bcdcore plot

def test_plot_command_is_an_argument_list_with_the_chart_settings(tmp_path):
    out = plot_path(tmp_path / "r1", "val/acc", "round", 0.9)
    assert out == tmp_path / "r1" / "figures" / "compare_val_acc_vs_round_ema0.9.png"
    cmd = plot_command([tmp_path / "r1", tmp_path / "r 2"], "val_loss", "wall_s", out, log_y=True, smooth=0.9,
                       python="py")
    assert cmd == ["py", "-m", "bcdcore.cli", "plot", str(tmp_path / "r1"), str(tmp_path / "r 2"), "--x", "wall_s",
                   "--y", "val_loss", "--out", str(out), "--logy", "--smooth", "0.9"]
    assert "--smooth" not in plot_command([tmp_path], "train_loss", "round", out)


def test_run_plot_reports_the_written_path_or_one_line():
    def fake(code, out="", err=""):
        return lambda cmd, **kw: subprocess.CompletedProcess(cmd, code, out, err)

    cmd = ["py", "--out", "x.png"]
    assert run_plot(cmd, fake(0, "wrote x.png\n")) == (True, "wrote x.png")
    assert run_plot(cmd, fake(2, "", "error: r: no metric 'val_loss' in its events\n")) == \
        (False, "error: r: no metric 'val_loss' in its events")
    assert run_plot(cmd, fake(1, "", "")) == (False, "bcdcore plot exited with 1")

    def slow(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    def missing(cmd, **kw):
        raise FileNotFoundError(2, "No such file or directory")

    assert run_plot(cmd, slow, timeout=3) == (False, "bcdcore plot did not finish in 3 s")
    assert run_plot(cmd, missing) == (False, "cannot start bcdcore plot: No such file or directory")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "bcdcore.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_bcdcore_plot_smooth_writes_a_png_and_refuses_a_bad_factor(tmp_path):
    runs = demo_runs(tmp_path / "runs")[:2]
    out = tmp_path / "smooth.png"
    done = _cli("plot", *map(str, runs), "--x", "round", "--y", "train_loss", "--smooth", "0.9", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out}" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = _cli("plot", str(runs[0]), "--smooth", "1", "--out", str(tmp_path / "bad.png"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--smooth 1.0" in bad.stderr
    assert not (tmp_path / "bad.png").exists()


# ----------------------------------------------------------------------------------------------------------
# pilot: the screen

@pytest.fixture
def place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    (tmp_path / "recipes").mkdir()
    demo_runs(tmp_path / "runs")
    return tmp_path


async def open_compare(pilot, app: BcdApp, run_ids: list[str]) -> CompareScreen:
    await pilot.pause()
    table = app.runs_screen.query_one("#runs", DataTable)
    for run_id in run_ids:
        table.move_cursor(row=table.get_row_index(run_id))
        await pilot.press("space")
    await pilot.press("c")
    await pilot.pause()
    assert isinstance(app.screen, CompareScreen)
    return app.screen


def _rows(table: DataTable) -> dict[str, list[str]]:
    return {str(table.get_row_at(i)[0]): [str(c) for c in table.get_row_at(i)[1:]] for i in range(table.row_count)}


async def test_compare_summary_legend_and_smoothing(place):
    app = BcdApp(place / "runs", place / "recipes", slots=[cpu_slot()], refresh_s=0.1)
    async with app.run_test(size=(160, 48)) as pilot:
        screen = await open_compare(pilot, app, [A, B])
        finals = [RunFollower(place / "runs" / r) for r in (A, B)]
        for f in finals:
            f.poll()
        summary = _rows(screen.query_one("#summary", DataTable))
        assert summary["train_loss final"] == [f"{f.last_metrics()['train_loss']:.4g}" for f in finals]
        assert summary["test_acc"] == [f"{f.last_metrics()['test_acc']:.4g}" for f in finals]
        assert summary["grad_evals"] == ["600", "600"] and summary["wall time"] == ["15.0s", "15.0s"]
        chart = screen.query_one("#cmp-chart")
        assert [s.label for s in chart.series] == ["K=10 lambda=0.01 seed=0", "K=5 lambda=0.05 seed=1"]
        raw = [list(s.ys) for s in chart.series]
        await pilot.press("s")
        assert screen.smooth == 0.5 and "EMA 0.5" in chart.border_title
        assert "EMA 0.5" in str(screen.query_one("#cmp-status", Static).render())
        assert [list(s.ys) for s in chart.series[:2]] == raw  # the raw curves, still drawn
        assert [list(s.ys) for s in chart.series[2:]] == [ema(ys, 0.5) for ys in raw]
        await pilot.press("S")
        assert screen.smooth == 0.0 and "EMA" not in chart.border_title and len(chart.series) == 2
        await pilot.press("v")
        titles = [c.border_title for c in screen.query("GridChart") if c.display and c.has_class("-used")]
        assert [t.split(" vs ")[0] for t in titles] == ["train_loss", "val_loss", "val_acc"]
        await pilot.press("v")
        assert not screen.grid and not screen.query_one("#cmp-chart-1").has_class("-used")


async def test_p_writes_the_chart_as_png_or_shows_the_error(place):
    write_run(place / "runs", "noval-20261126-050000-aaaaaa", eval_every=0, started=1_795_009_000.0,
              recipe=resolved_recipe("noval", algorithm={"K": 3}))
    app = BcdApp(place / "runs", place / "recipes", slots=[cpu_slot()], refresh_s=0.1)
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_compare(pilot, app, [A, B])
        await pilot.press("s", "p")
        out = place / "runs" / A / "figures" / "compare_train_loss_vs_round_ema0.5.png"
        await _until(pilot, lambda: screen.message.startswith(("wrote", "error")), "the plot")
        assert screen.message == f"wrote {out}", screen.message
        assert out.read_bytes()[:4] == b"\x89PNG"
        assert str(out) in str(screen.query_one("#cmp-status", Static).render())
        await pilot.press("escape")
        screen = CompareScreen(app.ws.compare([A, "noval-20261126-050000-aaaaaa"]))
        await app.push_screen(screen)
        await pilot.pause()
        await pilot.press("y", "p")  # val_loss: the second run has none
        await _until(pilot, lambda: screen.message.startswith(("wrote", "error")), "the plot")
        assert screen.message.startswith("error: ") and "no metric 'val_loss'" in screen.message
        assert "\n" not in screen.message


async def _until(pilot, predicate, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.1)


def test_plot_path_of_the_screen_is_in_the_first_run(tmp_path):
    expected = Path("runs/a/figures/compare_train_loss_vs_round.png")
    assert plot_path(Path("runs/a"), "train_loss", "round", 0.0) == expected


async def test_runs_with_one_recipe_are_named_by_short_id_or_display_name(place):
    from bcdcore.annotations import update_annotations

    recipe = resolved_recipe("same")
    for i, run_id in enumerate(("same-20261126-060000-aaaaaa", "same-20261126-061000-bbbbbb")):
        write_run(place / "runs", run_id, recipe=recipe, started=1_795_010_000.0 + 600 * i)
    update_annotations(place / "runs" / "same-20261126-061000-bbbbbb", name="baseline")
    app = BcdApp(place / "runs", place / "recipes", slots=[cpu_slot()], refresh_s=0.1)
    async with app.run_test(size=(160, 48)) as pilot:
        screen = CompareScreen(app.ws.compare(["same-20261126-060000-aaaaaa", "same-20261126-061000-bbbbbb"]))
        await app.push_screen(screen)
        await pilot.pause()
        assert [s.label for s in screen.query_one("#cmp-chart").series] == ["same-aaaaaa", "baseline-bbbbbb"]
        assert "(the recipes are identical)" in str(screen.query_one("#diff", DataTable).get_row_at(0)[0])


async def test_summary_and_chart_follow_a_live_run(place):
    import json

    live = "sweep_k-20261126-040000-a1b2c3"  # running, 75 of 200 rounds written
    app = BcdApp(place / "runs", place / "recipes", slots=[cpu_slot()], refresh_s=0.1)
    async with app.run_test(size=(160, 48)) as pilot:
        screen = CompareScreen(app.ws.compare([A, live]))
        await app.push_screen(screen)
        await pilot.pause()
        assert _rows(screen.query_one("#summary", DataTable))["grad_evals"][1] == f"{75 * 4 * 5:,}"
        event = {"v": 1, "kind": "metric", "t": 1_795_004_300.0, "round": 76, "grad_evals": 76 * 4 * 5,
                 "wall_s": 38.0, "train_loss": 0.0123}
        with open(place / "runs" / live / "metrics.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")
        await _until(pilot, lambda: _rows(screen.query_one("#summary", DataTable))["train_loss final"][1] == "0.0123",
                     "the new line in the summary")
        summary = _rows(screen.query_one("#summary", DataTable))
        assert summary["grad_evals"][1] == "1,520" and summary["train_loss best"][1] == "0.0123"
        assert screen.query_one("#cmp-chart").series[1].ys[-1] == 0.0123
