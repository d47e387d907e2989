"""A recipe run with the reference ops and with the compiled CPU ops gives the same metrics.

Tolerance: rtol 1e-5 on every loss and accuracy (the compiled step is bit-identical to the reference for
SGD and momentum; Adam's sqrt may differ in the last ulp, which a few rounds amplify only slightly).
"""
from __future__ import annotations

import pytest
from conftest import tiny_recipe

from bcdcore import ops
from bcdcore.cli import main
from bcdcore.rundir import read_events

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends(), reason="compiled cpu ops not built")


@pytest.mark.parametrize("solver", ["sgd", "momentum", "adam"])
def test_reference_and_cpu_backends_agree_on_a_run(solver, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BCD_OPS", raising=False)
    (tmp_path / "r.toml").write_text(tiny_recipe(replace={'solver = "sgd"': f'solver = "{solver}"',
                                                          "rounds = 3": "rounds = 4", "gamma = 1.0": "gamma = 0.8"}))
    metrics, starts = {}, {}
    for backend in ("reference", "cpu"):
        assert main(["run", str(tmp_path / "r.toml"), "--runs-dir", str(tmp_path / backend), "--quiet",
                     "--set", f'run.ops_backend="{backend}"']) == 0
        run_dir = next(p for p in (tmp_path / backend).iterdir())
        metrics[backend] = read_events(run_dir, "metric")
        starts[backend] = read_events(run_dir, "start")[0]["backend"]
    capsys.readouterr()
    assert starts == {"reference": "reference", "cpu": "cpu"}  # the start event names the op backend
    assert len(metrics["reference"]) == len(metrics["cpu"]) == 4
    for ref, cpu in zip(metrics["reference"], metrics["cpu"]):
        for key in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc"):
            if key in ref:
                assert cpu[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
