"""A run as the runs table holds it (`RunRow`), the states' order and filters, and `StateTally`: the counts by
state and the live runs, kept up to date row by row (the app asks for both at every refresh; at 10,000 runs a
pass over every row would cost milliseconds each time)."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bcdcore.rundir import display_id

STATE_ORDER = {"starting": 0, "queued": 1, "running": 2, "lost": 3, "error": 4, "unreadable": 5, "failed": 6,
               "killed": 7, "finished": 8, "unknown": 9}
ACTIVE = frozenset({"queued", "starting", "running"})
PROBLEMS = frozenset({"failed", "killed", "lost", "error", "unreadable"})
# name -> the states it shows (None = all); `f` on the runs screen cycles through them in this order
STATE_FILTERS: dict[str, frozenset | None] = {
    "all": None, "active": ACTIVE, "finished": frozenset({"finished"}), "problems": PROBLEMS}


@dataclass
class RunRow:
    id: str
    path: Path | None
    recipe: str = ""
    state: str = "unknown"
    round: int = 0
    rounds: int = 0
    eta_s: float = math.nan
    train_loss: float = math.nan
    val_name: str = ""
    val_value: float = math.nan
    test_name: str = ""
    test_value: float = math.nan
    gpu: str = ""
    started: float = math.nan
    ended: float = math.nan
    pid: int | None = None
    host: str = ""
    error: str = ""
    exit_code: int | None = None
    job_id: str = ""  # a launch without a run directory yet
    holder: str = ""  # host:pid holding the run's writer lock ("" when nobody does)
    note: str = ""  # what was skipped reading it (bad event lines in the window read)
    name: str = ""  # the display name the user gave it (annotations.json)
    tags: tuple[str, ...] = ()
    notes: str = ""
    config: dict = field(default_factory=dict)  # recipe keys the table shows (cfg: columns): key -> text

    @property
    def display(self) -> str:
        """The short id the table shows: name (or the user's display name) + 6 hex."""
        return display_id(self.id, self.name)

    @property
    def progress(self) -> float:
        return min(1.0, self.round / self.rounds) if self.rounds else 0.0

    def sort_value(self, column: str):
        if column == "state":
            value = STATE_ORDER.get(self.state, 9)
        elif column == "progress":
            value = self.progress
        elif column == "tags":
            value = " ".join(self.tags)
        elif column in _SORT_ATTRS:
            value = getattr(self, _SORT_ATTRS[column])
        else:  # a config column, cfg:KEY
            value = self.config.get(column.removeprefix("cfg:"), "")
        if isinstance(value, float) and math.isnan(value):
            return (1, 0.0)  # missing values sort last
        return (0, value)


_SORT_ATTRS = {"run": "id", "recipe": "recipe", "round": "round", "eta": "eta_s", "train_loss": "train_loss",
               "val": "val_value", "gpu": "gpu", "started": "started"}


class StateTally:
    """Counts by state and the runs whose process is alive on this host, updated as rows come, change and go."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.counts: Counter = Counter()
        self.live: dict[str, tuple[str, str]] = {}  # name -> (run_dir, gpu)
        self._state: dict[str, str] = {}

    def put(self, name: str, row: RunRow) -> None:
        old = self._state.get(name)
        if old != row.state:
            self._uncount(old)
            self.counts[row.state] += 1
            self._state[name] = row.state
        if row.path is not None and row.host in ("", self.host) and (
                row.state == "running" or (row.state == "queued" and row.pid)):
            self.live[name] = (str(row.path), row.gpu)
        else:
            self.live.pop(name, None)

    def drop(self, name: str) -> None:
        self._uncount(self._state.pop(name, None))
        self.live.pop(name, None)

    def _uncount(self, state: str | None) -> None:
        if state is not None:
            self.counts[state] -= 1
            if not self.counts[state]:
                del self.counts[state]
