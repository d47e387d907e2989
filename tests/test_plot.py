"""bcdcore plot: paper colour order, seed groups as mean +/- std bands, formats, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgb

from bcdcore.plot import PAPER_COLOURS, PlotError, colours, group_by_seed, plot_runs
from bcdcore.recipe import parse_recipe, to_toml
from bcdcore.rundir import RunDir


def fake_run(runs, lr: float, seed: int, losses: list[float]):
    recipe = parse_recipe({"run": {"name": "fake", "seed": seed}, "algorithm": {"lr": lr}})
    rd = RunDir.create(runs, "fake", f"{lr}-{seed}".encode().hex() + "000000", to_toml(recipe.to_dict()))
    for t, loss in enumerate(losses, 1):
        rd.event("metric", round=t, grad_evals=10 * t, samples=320 * t, wall_s=0.1 * t, train_loss=loss,
                 val_loss=loss + 0.1)
    rd.close()
    return rd.path


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng()
    out = []
    for i, lr in enumerate([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]):
        out.append(fake_run(tmp_path, lr, 0, list(np.exp(-np.arange(5) * (i + 1) / 5) + rng.random(5) * 0.01)))
    return out


def test_colour_order_follows_the_paper_convention(runs, tmp_path):
    fig = plot_runs(runs, x="grad_evals", y="train_loss", out=tmp_path / "c.png")
    got = [to_rgb(line.get_color()) for line in fig.axes[0].get_lines()]
    expected = [to_rgb(c) for c in PAPER_COLOURS] + [to_rgb(colours(7)[6])]
    assert got == expected
    assert to_rgb(colours(7)[6]) not in [to_rgb(c) for c in PAPER_COLOURS]  # then matplotlib's defaults
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_runs_differing_only_by_seed_become_one_band(tmp_path):
    a = fake_run(tmp_path, 0.1, 0, [1.0, 0.8, 0.6])
    b = fake_run(tmp_path, 0.1, 1, [1.2, 1.0, 0.8])
    c = fake_run(tmp_path, 0.2, 0, [1.0, 0.5, 0.2])
    assert [len(g) for g in group_by_seed([a, b, c])] == [2, 1]
    fig = plot_runs([a, b, c], x="round", y="train_loss")
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 2
    np.testing.assert_allclose(lines[0].get_ydata(), [1.1, 0.9, 0.7])  # the mean of the two seeds
    assert len(ax.collections) == 1  # one std band
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.6) and band.max() == pytest.approx(1.2)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["lr=0.1 (n=2)", "lr=0.2"]


def test_log_scale_and_pdf(runs, tmp_path):
    fig = plot_runs(runs[:2], x="wall_s", y="val_loss", out=tmp_path / "f.pdf", logy=True)
    assert fig.axes[0].get_yscale() == "log"
    assert (tmp_path / "f.pdf").read_bytes().startswith(b"%PDF")


def test_bad_requests_are_clear(runs, tmp_path):
    with pytest.raises(PlotError, match="no metric 'val_acc'"):
        plot_runs(runs[:1], y="val_acc")
    with pytest.raises(PlotError, match="--x"):
        plot_runs(runs[:1], x="epochs")
    with pytest.raises(PlotError, match="not a run directory"):
        plot_runs([tmp_path / "nothing"])
    with pytest.raises(PlotError, match=".png or .pdf"):
        plot_runs(runs[:1], out=tmp_path / "x.jpg")
