"""The Python API: bcdcore.train takes a path, TOML text, a dict or objects, writes the same run directory as
the CLI (same numbers for the same recipe and seed), and load_run reads any run back without raising."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, cli_env
from torch import nn

import bcdcore
from bcdcore.cli import main
from bcdcore.data import DataBundle, Split
from bcdcore.recipe import RecipeError
from bcdcore.rundir import list_runs, read_events

pytestmark = pytest.mark.usefixtures("single_torch_thread")
CUSTOM = REPO / "examples" / "custom"


def test_import_bcdcore_stays_light():
    code = "import sys, bcdcore; print('torch' in sys.modules, callable(bcdcore.train), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True)
    assert out.stdout.split() == ["False", "True", "False"]  # torch only once a run is trained


def test_train_from_text_matches_the_cli_run_number_for_number(tmp_path, capsys):
    (tmp_path / "tiny.toml").write_text(TINY)
    assert main(["run", str(tmp_path / "tiny.toml"), "--runs-dir", str(tmp_path / "cli"), "--quiet"]) == 0
    capsys.readouterr()
    cli_run = bcdcore.load_run(list_runs(tmp_path / "cli")[0])
    api_run = bcdcore.train(TINY, runs_dir=tmp_path / "api")
    assert api_run.state == cli_run.state == "finished" and api_run.exit_code == 0
    for key in ("train_loss", "val_loss", "val_acc", "grad_evals"):
        np.testing.assert_array_equal(api_run.history[key], cli_run.history[key])
    assert api_run.final["test_acc"] == cli_run.final["test_acc"]
    assert (api_run.path / "recipe.toml").read_text() == (cli_run.path / "recipe.toml").read_text()
    # the history is the metrics file's, as arrays
    metrics = [e for e in read_events(api_run.path) if e["kind"] == "metric"]
    assert list(api_run.history["train_loss"]) == [e["train_loss"] for e in metrics]
    assert api_run.history["round"].dtype == np.float64 and len(api_run.history["round"]) == 3


def test_train_from_a_path_and_a_dict_and_ls_sees_them(tmp_path, capsys):
    (tmp_path / "tiny.toml").write_text(TINY)
    a = bcdcore.train(tmp_path / "tiny.toml", runs_dir=tmp_path / "runs", overrides=["run.rounds=1"])
    b = bcdcore.train({"run": {"name": "fromdict", "rounds": 2, "device": "cpu"}, "data": {"name": "digits_flat"},
                       "model": {"widths": [8]}, "algorithm": {"K": 1}}, runs_dir=tmp_path / "runs")
    assert len(a.history["round"]) == 1 and len(b.history["round"]) == 2
    assert main(["ls", "--runs-dir", str(tmp_path / "runs"), "--json"]) == 0
    listed = capsys.readouterr().out
    assert a.path.name in listed and b.path.name in listed and listed.count('"finished"') == 2


def test_objects_in_place_of_names(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 6, generator=g)
    data = DataBundle("xor-ish", "classification", (6,), 2, Split(x, ((x[:, 0] * x[:, 1]) > 0).long()))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 16), nn.Tanh()), nn.Linear(16, 2)])

        def forward(self, z):
            return self.blocks[1](self.blocks[0](z))

    net = Net()
    before = net.blocks[1].weight.detach().clone()
    run = bcdcore.train({"run": {"name": "objects", "rounds": 3, "device": "cpu"}, "algorithm": {"K": 2}},
                        model=net, data=data, runs_dir=tmp_path)
    assert run.state == "finished" and run.recipe.model.name.startswith("live:model-Net")
    assert not torch.equal(before, net.blocks[1].weight.detach())  # the object itself was trained
    start = next(e for e in read_events(run.path) if e["kind"] == "start")
    assert start["block_sizes"] == [6 * 16 + 16, 16 * 2 + 2]
    # carved splits: 150 samples, val 0.1 and test 0.2 -> 15 and 30 held out, seeded
    assert run.final["test_acc"] * 30 == pytest.approx(round(run.final["test_acc"] * 30))
    # an importable builder is recorded by its dotted path
    sys.path.insert(0, str(CUSTOM))
    try:
        from mypkg.nets import build

        by_path = bcdcore.train({"run": {"name": "builder", "rounds": 1, "device": "cpu"}}, model=build,
                                data=data, runs_dir=tmp_path)
    finally:
        sys.path.remove(str(CUSTOM))
    assert by_path.recipe.model.name == "mypkg.nets:build"


def test_bad_calls_are_one_line_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="has a \\[sweep\\] table"):
        bcdcore.train(TINY + '\n[sweep]\n"algorithm.K" = [1, 2]\n', runs_dir=tmp_path)
    with pytest.raises(RecipeError, match="expected a path, TOML text, a dict or a Recipe"):
        bcdcore.train(42, runs_dir=tmp_path)
    with pytest.raises(RecipeError, match="no such recipe file"):
        bcdcore.train(tmp_path / "missing.toml", runs_dir=tmp_path)
    with pytest.raises(RecipeError, match="not a run directory"):
        bcdcore.load_run(tmp_path / "missing")
    assert not list(tmp_path.iterdir())  # nothing was written


def test_load_run_never_raises_on_contents(tmp_path):
    run = tmp_path / "broken-run"
    run.mkdir()
    (run / "status.json").write_bytes(b"\xff{not json")
    (run / "metrics.jsonl").write_text('{"v": 1, "kind": "metric", "round": 1, "train_loss": 0.5}\nnot json\n')
    (run / "recipe.toml").write_text("[[[")
    result = bcdcore.load_run(run)
    assert result.state == "unreadable" and result.recipe is None
    assert list(result.history["train_loss"]) == [0.5] and result.final["train_loss"] == 0.5
