"""Compute accounting (issue 14): the flop table against hand counts of every layer, and the cumulative `flops`
of every metric event against an independent count of the passes the run made."""
from __future__ import annotations

import pytest
import torch.nn.functional as F
from conftest import tiny_recipe

from bcdcore.cli import main
from bcdcore.data import load_data
from bcdcore.flops import count_table
from bcdcore.measure import fixed_batch
from bcdcore.models import build_model
from bcdcore.params import FlatParams
from bcdcore.recipe import DataConfig, ModelConfig
from bcdcore.rundir import read_events


def mlp_layers(widths: list[int], n_in: int = 64, n_out: int = 10) -> list[tuple[float, float]]:
    """Per layer (one block each): (forward FLOPs per sample, weight-gradient FLOPs per sample); the input
    gradient of a linear layer costs as much as its forward."""
    dims = [n_in] + widths + [n_out]
    return [(2.0 * a * b, 2.0 * a * b) for a, b in zip(dims[:-1], dims[1:])]


def cnn_layers(widths: list[int], c: int = 1, h: int = 8, w: int = 8, n_out: int = 10) -> list[tuple[float, float]]:
    """3x3 convolutions, padding 1 (output the input's size), max-pool 2 after each; then a linear head."""
    out = []
    for width in widths:
        conv = 2.0 * width * h * w * c * 9
        out.append((conv, conv))
        c, h, w = width, h // 2, w // 2
    out.append((2.0 * c * h * w * n_out, 2.0 * c * h * w * n_out))
    return out


def hand_table(layers: list[tuple[float, float]], batch: int) -> tuple[float, list[float], float]:
    """forward, backward per block (its weight gradient, plus the input gradient of every later layer; the
    first layer's input needs none), full backward."""
    forward = batch * sum(f for f, _ in layers)
    backward = [batch * (layers[i][1] + sum(f for f, _ in layers[i + 1:])) for i in range(len(layers))]
    full = batch * (sum(g for _, g in layers) + sum(f for f, _ in layers[1:]))
    return forward, backward, full


@pytest.mark.parametrize("model_name, widths", [("mlp", [32, 16]), ("cnn", [4, 6])])
def test_flop_table_matches_a_hand_count(model_name, widths):
    data = load_data(DataConfig(name="digits" if model_name == "cnn" else "digits_flat"), 0)
    model = build_model(ModelConfig(name=model_name, widths=widths), data.input_shape, 10, 0)
    params = FlatParams(model, model.blocks)
    buffers = params.snapshot_buffers()
    flat = params.flat.detach().clone()
    table = count_table(model, params, F.cross_entropy, fixed_batch(data.train.x, data.train.y, 48, 0))
    layers = mlp_layers(widths) if model_name == "mlp" else cnn_layers(widths)
    forward, backward, full = hand_table(layers, 48)
    assert table.forward == pytest.approx(forward, rel=0.05)
    assert table.backward == pytest.approx(backward, rel=0.05)
    assert table.full_backward == pytest.approx(full, rel=0.05)
    assert table.block_pass(0) > table.block_pass(len(layers) - 1)  # the head's backward stops at the head
    # counting left the model as it was
    assert all(p.grad is not None for p in model.parameters())
    assert all((a == b).all() for bs, cs in zip(buffers, params.snapshot_buffers()) for a, b in zip(bs, cs))
    assert (params.flat == flat).all()


CASES = {
    "mlp": ({"widths = [16]": "widths = [24, 16]"}, "digits_flat", mlp_layers([24, 16])),
    "cnn": ({"widths = [16]": "widths = [4, 4]", 'name = "digits_flat"': 'name = "digits"',
             'name = "mlp"': 'name = "cnn"'}, "digits", cnn_layers([4, 4])),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["blockwise", "entire"])
def test_metric_flops_agree_with_an_independent_count(tmp_path, capsys, case, mode):
    """Every metric event carries the cumulative flops: the passes of the block events (or K per round in
    entire mode) times the hand count of one pass, plus the forward passes of evaluation; grad_evals is that
    over one full forward+backward. The rule is on, so passes differ from K."""
    replace, dataset, layers = CASES[case]
    replace = dict(replace)
    replace['mode = "blockwise"'] = f'mode = "{mode}"'
    replace["rounds = 3"] = "rounds = 4"
    replace["K = 2"] = "K = 6\naccuracy_factor = 5000.0"
    (tmp_path / "r.toml").write_text(tiny_recipe(replace=replace))
    assert main(["run", str(tmp_path / "r.toml"), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    run_dir = capsys.readouterr().out.split("run directory: ")[1].split()[0]
    data = load_data(DataConfig(name=dataset), 0)
    batch = 32
    forward, backward, full = hand_table(layers, batch)
    per_sample = forward / batch
    blocks = read_events(run_dir, "block")
    metrics = read_events(run_dir, "metric")
    assert len(metrics) == 4
    if mode == "blockwise":
        assert any(b["stopped_early"] for b in blocks)  # passes are not simply K per block
    expected = 0.0
    for m in metrics:
        t = m["round"]
        if mode == "blockwise":
            expected += sum((forward + backward[b["block"]]) * b["passes"] for b in blocks if b["round"] == t)
        else:
            expected += 6 * (forward + full)
        expected += per_sample * len(data.val.x)  # eval.every = 1
        if "test_loss" in m:
            expected += per_sample * len(data.test.x)
        assert m["flops"] == pytest.approx(expected, rel=0.05), t
        assert m["grad_evals"] == pytest.approx(m["flops"] / (forward + full), rel=0.05)
    start = read_events(run_dir, "start")[0]
    assert start["flop_table"]["forward"] == pytest.approx(forward, rel=0.05)


def test_measurements_and_auto_lambda_count_in_flops(tmp_path, capsys):
    text = tiny_recipe(replace={"lambda = 0.01": 'lambda = "auto"\nlambda_batch_size = 64\nlambda_batches = 2'},
                       append='\n[[measure]]\nunit = "grad_norm"\nevery = 2\n')
    (tmp_path / "r.toml").write_text(text)
    assert main(["run", str(tmp_path / "r.toml"), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    run_dir = capsys.readouterr().out.split("run directory: ")[1].split()[0]
    blocks = read_events(run_dir, "block")
    start = read_events(run_dir, "start")[0]["flop_table"]
    training = sum((start["forward"] + start["backward"][b["block"]]) * b["passes"] for b in blocks)
    metrics = read_events(run_dir, "metric")
    measures = read_events(run_dir, "measure")
    lam = [m for m in measures if m.get("purpose") == "lambda auto"][0]
    assert lam["batches"] == 2 and len(lam["lambda_per_batch"]) == 2 and lam["lambda_spread"] >= 0
    grad_norm = [m for m in measures if m["unit"] == "grad_norm"]
    assert [m["round"] for m in grad_norm] == [2]
    assert all(m["flops"] > 0 for m in grad_norm)
    # Every pass is in the last metric: training, evaluation (val every round, test at the end), grad_norm
    # and the lambda measurement, whose Hessian-vector products cost at least a forward + backward each.
    assert lam["flops"] > lam["hvp"] * start["forward"]
    data = load_data(DataConfig(name="digits_flat"), 0)
    evaluation = start["forward"] / start["batch_size"] * (len(metrics) * len(data.val.x) + len(data.test.x))
    total = training + evaluation + grad_norm[0]["flops"] + lam["flops"]
    assert metrics[-1]["flops"] == pytest.approx(total, rel=1e-9)
