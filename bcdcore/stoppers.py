"""Stoppers: each looks at one round's metrics and may end the run with a reason.

A stopper returns None to go on, or (state, reason) with state "finished" (a goal or budget was reached) or
"failed" (the run diverged). Non-finite losses always end the run as failed, with or without a stopper.
"""
from __future__ import annotations

import math
from typing import Protocol

from bcdcore import plugins
from bcdcore.recipe import StopConfig

Verdict = tuple[str, str] | None


class Stopper(Protocol):
    def update(self, metrics: dict, wall_s: float) -> Verdict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class _Stateless:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Patience:
    """Stop when `metric` has not improved by more than min_delta for `patience` evaluations."""

    def __init__(self, metric: str, patience: int, min_delta: float) -> None:
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.sign = -1.0 if "acc" in metric else 1.0  # accuracies grow, losses shrink
        self.best = math.inf
        self.bad = 0

    def update(self, metrics: dict, wall_s: float) -> Verdict:
        if self.metric not in metrics:
            return None
        value = self.sign * metrics[self.metric]
        if value < self.best - self.min_delta:
            self.best, self.bad = value, 0
            return None
        self.bad += 1
        if self.bad >= self.patience:
            return "finished", f"no improvement in {self.metric} for {self.bad} evaluations"
        return None

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad = state["best"], state["bad"]


class Target(_Stateless):
    def __init__(self, metric: str, value: float, at_most: bool) -> None:
        self.metric, self.value, self.at_most = metric, value, at_most

    def update(self, metrics: dict, wall_s: float) -> Verdict:
        v = metrics.get(self.metric)
        if v is None or not math.isfinite(v):
            return None
        if (v <= self.value) if self.at_most else (v >= self.value):
            sign = "<=" if self.at_most else ">="
            return "finished", f"target reached: {self.metric} {v:.4g} {sign} {self.value:g}"
        return None


class WallTime(_Stateless):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def update(self, metrics: dict, wall_s: float) -> Verdict:
        if wall_s >= self.seconds:
            return "finished", f"wall time limit reached ({self.seconds:g} s)"
        return None


class Divergence(_Stateless):
    """Non-finite losses always; with max_loss, also `metric` above it."""

    def __init__(self, metric: str = "train_loss", max_loss: float = math.inf) -> None:
        self.metric, self.max_loss = metric, max_loss

    def update(self, metrics: dict, wall_s: float) -> Verdict:
        for key in ("train_loss", "val_loss"):
            v = metrics.get(key)
            if v is not None and not math.isfinite(v):
                return "failed", f"diverged: {key} is {v}"
        v = metrics.get(self.metric)
        if v is not None and v > self.max_loss:
            return "failed", f"diverged: {self.metric} {v:.4g} > max_loss {self.max_loss:g}"
        return None


def build_stoppers(configs: list[StopConfig], wall_time_s: float) -> list[Stopper]:
    stoppers: list[Stopper] = []
    for c in configs:
        if c.kind == "patience":
            stoppers.append(Patience(c.metric, c.patience, c.min_delta))
        elif c.kind == "target_loss":
            stoppers.append(Target(c.metric, c.value, at_most=True))
        elif c.kind == "target_accuracy":
            stoppers.append(Target(c.metric, c.value, at_most=False))
        elif c.kind == "wall_time":
            stoppers.append(WallTime(c.seconds))
        elif c.kind == "divergence":
            stoppers.append(Divergence(c.metric, c.max_loss))
        else:  # "pkg.module:Stopper"
            stoppers.append(PluginStopper(c))
    if not any(isinstance(s, Divergence) for s in stoppers):
        stoppers.insert(0, Divergence())
    if wall_time_s > 0:
        stoppers.append(WallTime(wall_time_s))
    return stoppers


class PluginStopper:
    """A plugin stopper (a class with update(metrics, wall_s) -> None | (state, reason), created with the
    [[stop]] table's other keys), its verdicts checked; state_dict/load_state_dict are optional."""

    def __init__(self, cfg: StopConfig) -> None:
        cls = plugins.resolve(cfg.kind, "stopper", "stop.kind")
        self.path = cfg.kind
        self.impl = plugins.call(cls, cfg.kind, "stop.kind", "stopper", **cfg.args)
        plugins.check_call(self.impl.update, cfg.kind, "stop.kind", "stopper", {}, 0.0)

    def update(self, metrics: dict, wall_s: float) -> Verdict:
        verdict = self.impl.update(dict(metrics), wall_s)
        if verdict is None:
            return None
        if not (isinstance(verdict, tuple) and len(verdict) == 2 and verdict[0] in ("finished", "failed")):
            raise plugins.PluginError(f"stop.kind = {self.path!r}: update returned {verdict!r}; return None to go "
                                      f"on, or (\"finished\" | \"failed\", reason)")
        return verdict[0], str(verdict[1])

    def state_dict(self) -> dict:
        get = getattr(self.impl, "state_dict", None)
        return dict(get()) if callable(get) else {}

    def load_state_dict(self, state: dict) -> None:
        put = getattr(self.impl, "load_state_dict", None)
        if callable(put):
            put(state)


def first_verdict(stoppers: list[Stopper], metrics: dict, wall_s: float) -> Verdict:
    """Every stopper sees every round (patience counts must not skip); a failure wins, else the first."""
    verdicts = [v for v in (s.update(metrics, wall_s) for s in stoppers) if v is not None]
    failed = [v for v in verdicts if v[0] == "failed"]  # a diverged run never counts as finished
    return (failed or verdicts or [None])[0]
