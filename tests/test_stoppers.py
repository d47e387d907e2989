"""Stoppers: patience (evaluations without improvement, min_delta, accuracies maximised), targets, wall time,
divergence (non-finite losses and max_loss), and how the run combines them."""
from __future__ import annotations

import math
import tomllib

import pytest
from conftest import TINY

from bcdcore.recipe import StopConfig, parse_recipe
from bcdcore.stoppers import Divergence, Patience, Target, WallTime, build_stoppers, first_verdict


def feed(stopper, values, metric="val_loss", wall=0.0):
    """Feed one value per round; return the 1-based index of the first verdict and the verdict."""
    for i, v in enumerate(values, 1):
        verdict = stopper.update({"train_loss": 1.0, metric: v}, wall)
        if verdict is not None:
            return i, verdict
    return None, None


# ----------------------------------------------------------------------------------------------------------
# patience

def test_patience_counts_evaluations_without_improvement():
    at, verdict = feed(Patience("val_loss", patience=3, min_delta=0.0), [1.0, 0.9, 0.95, 0.9, 0.91])
    # 1.0 and 0.9 improve; 0.95, 0.9 (equal is no improvement), 0.91 are three evaluations without one
    assert at == 5
    assert verdict[0] == "finished" and "val_loss" in verdict[1]


def test_patience_resets_on_improvement():
    at, _ = feed(Patience("val_loss", patience=2, min_delta=0.0), [1.0, 1.1, 0.5, 0.6, 0.55, 0.7])
    assert at == 5  # 1.1 is bad once, 0.5 resets, then 0.6 and 0.55 are two bad ones


def test_patience_respects_min_delta():
    p = Patience("val_loss", patience=2, min_delta=0.1)
    # 0.95 and 0.91 improve on 1.0 by less than min_delta: two evaluations without improvement
    assert feed(p, [1.0, 0.95, 0.91])[0] == 3
    p = Patience("val_loss", patience=2, min_delta=0.1)
    # 0.85 improves by 0.15 > min_delta and resets the count; then 0.8 and 0.76 are within min_delta of 0.85
    assert feed(p, [1.0, 0.95, 0.85, 0.8, 0.76])[0] == 5


def test_patience_maximises_accuracy():
    p = Patience("val_acc", patience=2, min_delta=0.0)
    # rising accuracy is improvement
    assert feed(p, [0.5, 0.6, 0.7, 0.8], metric="val_acc") == (None, None)
    at, verdict = feed(p, [0.75, 0.79], metric="val_acc")  # below the best 0.8: two bad evaluations
    assert at == 2 and "val_acc" in verdict[1]
    p = Patience("val_acc", patience=2, min_delta=0.05)
    assert feed(p, [0.5, 0.53, 0.54], metric="val_acc")[0] == 3  # +0.04 at most: within min_delta


def test_patience_only_counts_rounds_that_were_evaluated():
    p = Patience("val_loss", patience=2, min_delta=0.0)
    assert p.update({"train_loss": 1.0, "val_loss": 1.0}, 0.0) is None
    for _ in range(10):  # rounds without an evaluation do not count
        assert p.update({"train_loss": 2.0}, 0.0) is None
    assert p.update({"train_loss": 2.0, "val_loss": 1.5}, 0.0) is None
    assert p.update({"train_loss": 2.0, "val_loss": 1.5}, 0.0) is not None


def test_patience_state_survives_a_checkpoint():
    p = Patience("val_loss", patience=3, min_delta=0.0)
    feed(p, [1.0, 1.1, 1.2])  # two bad evaluations
    fresh = Patience("val_loss", patience=3, min_delta=0.0)
    fresh.load_state_dict(p.state_dict())
    assert fresh.update({"val_loss": 1.3}, 0.0) is not None
    assert Patience("val_loss", patience=3, min_delta=0.0).update({"val_loss": 1.3}, 0.0) is None


# ----------------------------------------------------------------------------------------------------------
# targets and wall time

def test_target_loss():
    t = Target("val_loss", 0.3, at_most=True)
    assert t.update({"train_loss": 0.1}, 0.0) is None  # not evaluated this round
    assert t.update({"val_loss": 0.31}, 0.0) is None
    assert t.update({"val_loss": math.nan}, 0.0) is None  # nan never reaches a target
    state, reason = t.update({"val_loss": 0.3}, 0.0)
    assert state == "finished" and reason.startswith("target reached") and "val_loss" in reason


def test_target_accuracy():
    t = Target("val_acc", 0.95, at_most=False)
    assert t.update({"val_acc": 0.94}, 0.0) is None
    state, reason = t.update({"val_acc": 0.96}, 0.0)
    assert state == "finished" and reason.startswith("target reached") and "val_acc" in reason


def test_wall_time():
    w = WallTime(10.0)
    assert w.update({"train_loss": 1.0}, 9.99) is None
    state, reason = w.update({"train_loss": 1.0}, 10.0)
    assert state == "finished" and "wall time" in reason


# ----------------------------------------------------------------------------------------------------------
# divergence

@pytest.mark.parametrize("key, value", [("train_loss", math.nan), ("train_loss", math.inf),
                                        ("train_loss", -math.inf), ("val_loss", math.nan),
                                        ("val_loss", math.inf)])
def test_divergence_on_non_finite_losses(key, value):
    metrics = {"train_loss": 1.0, key: value}
    state, reason = Divergence().update(metrics, 0.0)
    assert state == "failed" and reason.startswith("diverged") and key in reason


def test_divergence_max_loss():
    d = Divergence("train_loss", max_loss=10.0)
    assert d.update({"train_loss": 10.0}, 0.0) is None
    state, reason = d.update({"train_loss": 10.5}, 0.0)
    assert state == "failed" and reason.startswith("diverged") and "max_loss" in reason
    assert Divergence().update({"train_loss": 1e30}, 0.0) is None  # no max_loss: only non-finite values
    d = Divergence("val_loss", max_loss=2.0)
    assert d.update({"train_loss": 5.0}, 0.0) is None  # watches its own metric
    assert d.update({"train_loss": 1.0, "val_loss": 2.5}, 0.0)[0] == "failed"


# ----------------------------------------------------------------------------------------------------------
# built from the recipe, combined per round

def stops_from(text: str):
    recipe = parse_recipe(tomllib.loads(TINY + text), source="<test>")
    return recipe.stop


def test_build_stoppers_from_recipe_tables():
    configs = stops_from('''
[[stop]]
kind = "patience"
patience = 2
min_delta = 0.01

[[stop]]
kind = "target_accuracy"
value = 0.9

[[stop]]
kind = "wall_time"
seconds = 5
''')
    stoppers = build_stoppers(configs, wall_time_s=0.0)
    kinds = [type(s) for s in stoppers]
    assert kinds.count(Divergence) == 1  # always there, even when the recipe has none
    assert Patience in kinds and Target in kinds and WallTime in kinds
    patience = next(s for s in stoppers if isinstance(s, Patience))
    assert (patience.metric, patience.patience, patience.min_delta) == ("val_loss", 2, 0.01)
    target = next(s for s in stoppers if isinstance(s, Target))
    assert (target.metric, target.value) == ("val_acc", 0.9)
    assert first_verdict(stoppers, {"train_loss": 0.5, "val_loss": 0.5, "val_acc": 0.95}, 1.0)[0] == "finished"
    assert first_verdict(stoppers, {"train_loss": 0.5}, 5.0)[1].startswith("wall time")


def test_run_wall_time_budget_adds_a_stopper():
    stoppers = build_stoppers([], wall_time_s=2.0)
    assert first_verdict(stoppers, {"train_loss": 1.0}, 1.9) is None
    assert first_verdict(stoppers, {"train_loss": 1.0}, 2.0)[0] == "finished"
    assert first_verdict(build_stoppers([], 0.0), {"train_loss": 1.0}, 1e9) is None  # 0 = no limit


def test_every_stopper_sees_every_round():
    wall, patience = WallTime(1.0), Patience("val_loss", patience=2, min_delta=0.0)
    stoppers = [wall, patience]
    first_verdict(stoppers, {"val_loss": 1.0}, 0.0)
    assert first_verdict(stoppers, {"val_loss": 1.5}, 2.0)[1].startswith("wall time")
    assert patience.bad == 1  # patience still counted the round on which another stopper ended the run


def test_non_finite_loss_fails_even_when_a_target_is_met_the_same_round():
    stoppers = build_stoppers([StopConfig(kind="target_loss", metric="val_loss", value=1.0)], 0.0)
    verdict = first_verdict(stoppers, {"train_loss": math.nan, "val_loss": 0.5}, 0.0)
    assert verdict[0] == "failed" and verdict[1].startswith("diverged")


def test_non_finite_loss_fails_whatever_the_order_of_the_recipe_stoppers():
    """DESIGN/stoppers: a non-finite loss always ends the run as failed, with or without a stopper: a recipe
    that lists its own divergence stopper after a target must not turn a nan round into "target reached"."""
    configs = stops_from('''
[[stop]]
kind = "target_loss"
value = 1.0

[[stop]]
kind = "divergence"
max_loss = 100.0
''')
    verdict = first_verdict(build_stoppers(configs, 0.0), {"train_loss": math.nan, "val_loss": 0.5}, 0.0)
    assert verdict is not None and verdict[0] == "failed", verdict
