"""Resuming an augmented run (CIFAR random crops and flips) reproduces the uninterrupted run exactly."""
from __future__ import annotations

import signal

from zoo_files import write_cifar

from bcdcore.recipe import load_recipe
from bcdcore.run import resume_run, start_run
from bcdcore.rundir import read_events

RECIPE = """[run]
name = "aug"
device = "cpu"
rounds = 4

[data]
name = "cifar10"
root = "{root}"
augment = true
batch_size = 8
val_fraction = 0.2

[model]
name = "cnn"
widths = [4]

[algorithm]
K = 2
lr = 0.05

[eval]
every = 2
"""


def test_resumed_augmented_run_equals_uninterrupted(tmp_path):
    write_cifar(tmp_path / "data", per_batch=16)
    (tmp_path / "r.toml").write_text(RECIPE.format(root=tmp_path / "data"))
    recipe = load_recipe(tmp_path / "r.toml")
    whole = start_run(recipe, tmp_path / "runs")
    assert whole.execute() == 0

    cut = start_run(load_recipe(tmp_path / "r.toml"), tmp_path / "runs")
    trainer_round = cut.p.trainer.run_round

    def round_then_signal(t):  # as if SIGTERM arrived during round 2
        result = trainer_round(t)
        if t == 2:
            cut.signals.received = signal.SIGTERM
        return result

    cut.p.trainer.run_round = round_then_signal
    assert cut.execute() == 128 + signal.SIGTERM
    resumed = resume_run(cut.rundir.path)
    assert resumed.execute() == 0

    def losses(run):
        rows = {e["round"]: e for e in read_events(run.rundir.path, "metric")}
        return [(r, rows[r]["train_loss"], rows[r].get("val_loss"), rows[r].get("test_acc")) for r in sorted(rows)]

    assert losses(resumed) == losses(whole)
