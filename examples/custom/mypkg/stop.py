"""A stopper: end the run (finished) once train_loss has not improved by min_delta for `window` rounds."""
from __future__ import annotations

import math


class Plateau:
    def __init__(self, window: int = 5, min_delta: float = 0.0) -> None:
        self.window, self.min_delta = window, min_delta
        self.best, self.since = math.inf, 0

    def update(self, metrics: dict, wall_s: float) -> tuple[str, str] | None:
        loss = metrics.get("train_loss")
        if loss is None:
            return None
        if loss < self.best - self.min_delta:
            self.best, self.since = loss, 0
            return None
        self.since += 1
        if self.since >= self.window:
            return "finished", f"train_loss plateaued for {self.since} rounds (best {self.best:.4g})"
        return None

    def state_dict(self) -> dict:  # optional: kept in checkpoints, so --resume continues the count
        return {"best": self.best, "since": self.since}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.since = state["best"], state["since"]
