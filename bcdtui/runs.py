"""The runs table as data: one `RunRow` per run directory (plus launches that have no directory yet), refreshed
incrementally, sorted and filtered. The DataTable on the runs screen only mirrors `RunsModel.view()`.

A refresh stats each run's files and re-reads only what changed: status.json and the last few KiB of
metrics.jsonl (`tailer.read_tail`). The state is bcdcore.rundir.run_state's, the one rule of every reader.
"""
from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bcdcore.annotations import read_annotations
from bcdcore.rundir import RunState, display_id, id_time, lost_reason, printable, read_status_checked, run_state  # noqa: F401
from bcdcore.scheduler import is_zombie, reap_pid
from bcdtui.cells import (  # noqa: F401 - the formatting helpers, re-exported for the screens that show runs
    COLUMN_TITLES,
    COLUMNS,
    fmt_duration,
    fmt_number,
    fmt_time,
    pick_values,
    progress_bar,
    recipe_values,
    row_cells,
    with_config,
)
from bcdtui.cluster import run_entries
from bcdtui.rows import ACTIVE, PROBLEMS, STATE_FILTERS, STATE_ORDER, RunRow, StateTally  # noqa: F401 - re-exported
from bcdtui.runner import Job
from bcdtui.tailer import TailSummary, events_only_sig, file_sig, number, read_tail

_ENDED = frozenset({"finished", "failed", "killed"})
# an ended run's files change only when someone resumes or annotates it: with many runs, each refresh re-checks
# at most this many ended runs (in turn), so that one refresh stays short at 10,000 runs
ENDED_CHECKS_PER_REFRESH = 500
DEFER_ABOVE = 2000  # runs: from this many on, the first load paints before reading the events' tails
STATUS_FIRST = 500  # and before reading the status of all but this many runs (the newest by their ids)


@dataclass
class _Seen:
    status_sig: tuple = ()
    metrics_sig: tuple = ()
    status: dict = field(default_factory=dict)
    problem: str = ""  # why status.json cannot be read ("" when it can)
    tail: TailSummary = field(default_factory=TailSummary)
    notes_sig: tuple = ()
    annotations: tuple = ("", (), "")  # name, tags, notes
    config: dict | None = None  # the recipe's resolved values (read once, when config columns are shown)


@dataclass
class RefreshResult:
    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)

    @property
    def any(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def merge(self, other: "RefreshResult") -> None:
        """Take in what `other` saw change too."""
        self.added |= other.added
        self.removed |= other.removed
        self.changed |= other.changed


class RunsModel:
    """Rows of a runs directory; `refresh()` is incremental; `view()` sorts and filters."""

    def __init__(self, runs_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.runs_dir = Path(runs_dir)
        self.clock = clock
        self.rows: dict[str, RunRow] = {}
        self._seen: dict[str, _Seen] = {}
        self.sort_column = "started"
        self.sort_reverse = True
        self.filter_text = ""
        self.state_filter = "all"
        self.config_keys: tuple[str, ...] = ()  # recipe keys shown as columns (cfg:KEY), e.g. algorithm.K
        self.host = self._host = socket.gethostname()
        self._turn = 0  # which share of the ended runs this refresh re-checks
        self._dir_sig: tuple = ()
        self._sweep_dirs: list[str] = []  # sweep directories under runs_dir: their runs are listed too
        self._entries: list[tuple[str, str]] = []  # (name, path) of every entry of the runs (and sweep) dirs
        self._paths: dict[str, str] = {}  # the same, by name
        # A refresh checks the entries not known to have ended (new, live, unreadable ones) and a share of the
        # ended ones in turn, so that its cost follows the live runs, not all of them
        self._ended: set[str] = set()
        self._unended: dict[str, str] = {}  # name -> path, in the entries' order
        self._jobs: set[str] = set()  # keys of the rows of launches without a directory (job:ID)
        # name -> path of the runs whose status.json is still to read, newest last: the first load of many runs
        # paints before reading them
        self._pending_status: dict[str, str] = {}
        self._pending: list[str] = []  # runs whose events' tail is still to read (after a deferred first load)
        self._pending_config: list[str] = []  # runs whose recipe.toml is still to read (config columns)
        self.tally = StateTally(self._host)

    # --- refresh
    def refresh(self, jobs: list[Job] | None = None, force: set[str] | None = None,
                defer: bool = False) -> RefreshResult:
        """Re-read what changed on disk; `jobs` (the runner's) adds rows for launches without a directory.
        Live runs are checked at every refresh, ended ones in turns (ENDED_CHECKS_PER_REFRESH); `force` names
        runs to check now whatever their turn (one the user just annotated). `defer` (the first load): each
        new run's status is read now, its events' tail later, by `fill()`, newest first, so that the table
        paints at once at 10,000 runs."""
        result = RefreshResult()
        dir_sig = (file_sig(str(self.runs_dir)), *(file_sig(path) for path in self._sweep_dirs))
        gone: set[str] = set()
        if dir_sig != self._dir_sig or not dir_sig[0]:  # a run directory came or went (here or in a sweep)
            entries, self._sweep_dirs = run_entries(self.runs_dir)
            self._entries = [(e.name, e.path) for e in entries if not e.name.startswith(".")]
            self._paths = dict(self._entries)
            self._dir_sig = (dir_sig[0], *(file_sig(path) for path in self._sweep_dirs))
            self._ended &= self._paths.keys()
            self._unended = {name: path for name, path in self._entries
                             if name not in self._ended and name not in self._pending_status}
            gone = {name for name in self.rows if name not in self._paths and name not in self._jobs}
        if defer and not self._seen and len(self._entries) > DEFER_ABOVE:
            # the first load of many runs: the newest by their ids' start time now, the others by fill()
            order = sorted(self._unended.items(), key=lambda item: id_time(item[0]) or "~")  # other ids: first
            self._pending_status = dict(order[:-STATUS_FIRST])
            self._unended = dict(order[-STATUS_FIRST:])
        turns = max(1, -(-len(self._ended) // ENDED_CHECKS_PER_REFRESH))
        self._turn = (self._turn + 1) % turns
        check = dict(self._unended)
        for name, path in self._entries[self._turn::turns] if turns > 1 else self._entries:
            if name not in self._pending_status:  # this turn's share of the ended runs (every one while they are few)
                check.setdefault(name, path)
        for name in force or ():
            if name in self._paths and name not in self._pending_status:
                check.setdefault(name, self._paths[name])
        for name, entry_path in check.items():
            if not self._check(name, entry_path, result, defer) and name in self.rows:
                gone.add(name)
        if defer and self._pending:  # newest first: the rows the default sort shows at the top
            self._pending.sort(key=lambda n: self.rows[n].started if n in self.rows else 0.0)
        for name in gone:
            self._drop(name)
            self._seen.pop(name, None)
            self._ended.discard(name)
            if name in self._paths:  # its directory is still there: look at it at every refresh again
                self._unended[name] = self._paths[name]
            result.removed.add(name)
        if jobs is not None:
            self._merge_jobs(jobs, result)
        return result

    def _check(self, name: str, entry_path: str, result: RefreshResult, defer: bool) -> bool:
        """Re-read what changed of one run directory; False when it is not one (no status.json, no events)."""
        seen = self._seen.get(name)
        base = entry_path + os.sep  # plain strings: this runs for every live run four times a second
        status_sig = file_sig(base + "status.json") or events_only_sig(base)
        if not status_sig:
            return False  # not a run directory (or not yet)
        if seen is None:
            seen = self._seen[name] = _Seen()
        if status_sig == seen.status_sig and seen.status.get("state") in _ENDED:
            metrics_sig = seen.metrics_sig  # an ended run's events do not change until its status does
        else:
            metrics_sig = file_sig(base + "metrics.jsonl")
        notes_sig = file_sig(base + "annotations.json")
        dirty = False
        row = self.rows.get(name)
        path = row.path if row is not None and row.path is not None else Path(entry_path)
        if status_sig != seen.status_sig:
            seen.status, seen.problem = read_status_checked(path)
            seen.status_sig, dirty = status_sig, True
            if seen.status.get("state") in _ENDED:
                self._ended.add(name)
                self._unended.pop(name, None)
            else:  # live, unreadable, or resumed: looked at every refresh
                self._ended.discard(name)
                self._unended[name] = entry_path
        if metrics_sig != seen.metrics_sig:
            if defer and len(self._entries) > DEFER_ABOVE and seen.status.get("state") in _ENDED:
                self._pending.append(name)  # its tail comes with fill()
            else:
                seen.metrics_sig, seen.tail, dirty = metrics_sig, read_tail(path), True
        if notes_sig != seen.notes_sig:
            notes = read_annotations(path)[0]  # total: a broken file reads as none (the CLI says why)
            seen.notes_sig, seen.annotations, dirty = notes_sig, (notes.name, notes.tags, notes.notes), True
        if self.config_keys and seen.config is None and row is None:  # a new run; the others: fill()
            seen.config, dirty = recipe_values(path), True
        state = self._state(seen.status, path, seen.problem)
        if row is None or dirty or row.state != state.state or row.holder != (state.holder or ""):
            new = self._row(name, path, seen, state)
            if row is None:
                result.added.add(name)
            elif new != row:
                result.changed.add(name)
            self._put(name, new)
        return True

    def _put(self, name: str, row: RunRow) -> None:
        self.rows[name] = row
        self.tally.put(name, row)

    def _drop(self, name: str) -> None:
        del self.rows[name]
        self.tally.drop(name)

    @property
    def pending(self) -> int:
        """Runs still to be read after the first load: their status (no row yet), their events (the val and
        loss cells are blank) or their recipe (config columns)."""
        return len(self._pending_status) + len(self._pending) + len(self._pending_config)

    @property
    def unread_statuses(self) -> int:
        """Runs whose status.json is still to be read (their rows, counts and live processes are not known)."""
        return len(self._pending_status)

    def fill(self, budget_s: float = 0.02) -> RefreshResult:
        """Read what the first load deferred, newest run first, for at most `budget_s` seconds (the app calls it
        between refreshes until none is left): statuses, then events' tails, then recipes."""
        result = RefreshResult()
        deadline = time.perf_counter() + budget_s
        if self._pending_status:
            while self._pending_status:  # at least one per call
                name, path = self._pending_status.popitem()  # the newest left
                if name in self._paths and not self._check(name, path, result, defer=True):
                    self._unended[name] = path  # not a run directory yet: looked at every refresh
                if time.perf_counter() >= deadline:
                    break
            if self._pending_status:
                return result
            self._pending.sort(key=lambda n: self.rows[n].started if n in self.rows else 0.0)  # newest last
        while self._pending and time.perf_counter() < deadline:
            name = self._pending.pop()
            seen, row = self._seen.get(name), self.rows.get(name)
            if seen is None or row is None or row.path is None:
                continue
            seen.metrics_sig, seen.tail = file_sig(str(row.path / "metrics.jsonl")), read_tail(row.path)
            new = self._row(name, row.path, seen, self._state(seen.status, row.path, seen.problem))
            if new != row:
                self._put(name, new)
                result.changed.add(name)
        while self._pending_config and not self._pending and time.perf_counter() < deadline:
            name = self._pending_config.pop()
            seen, row = self._seen.get(name), self.rows.get(name)
            if seen is not None and row is not None and row.path is not None:
                seen.config = recipe_values(row.path)
                self._put(name, with_config(row, seen.config, self.config_keys))
                result.changed.add(name)
        return result

    def _state(self, status: dict, path: Path | None = None, problem: str = "") -> RunState:
        """bcdcore.rundir.run_state, the one rule; first our own exited children are reaped, since a zombie's
        pid still reads as alive (a run this app launched and that died without its end event)."""
        if status.get("state") in ("queued", "running") and status.get("host") == self._host \
                and is_zombie(status.get("pid")):
            reap_pid(status.get("pid"))
        return run_state(status, path, problem)

    def set_config_keys(self, keys: list[str] | tuple[str, ...]) -> None:
        """Show these recipe keys as columns; each run's recipe.toml is read once, by `fill()`, newest first."""
        self.config_keys = tuple(dict.fromkeys(k.strip() for k in keys if k.strip()))
        for name, row in sorted(self.rows.items(), key=lambda item: item[1].started if item[1].path else 0.0):
            seen = self._seen.get(name)
            if seen is None:
                continue
            if self.config_keys and seen.config is None and name not in self._pending_config:
                self._pending_config.append(name)
            self._put(name, with_config(row, seen.config or {}, self.config_keys))

    def _row(self, name: str, path: Path, seen: _Seen, shown: RunState) -> RunRow:
        status, tail, state = seen.status, seen.tail, shown.state
        progress = status.get("progress") or {}
        rnd = int(number(progress.get("round")) or 0) if progress.get("round") is not None else 0
        if tail.round is not None and tail.round > rnd:
            rnd = tail.round
        rounds = int(number(progress.get("rounds")) or 0) if progress.get("rounds") is not None else 0
        eta = math.nan
        if state == "running" and rounds:
            per = tail.seconds_per_round
            started = number(status.get("started"))
            if not math.isfinite(per) and rnd > 0 and math.isfinite(started) and math.isfinite(tail.last_t):
                per = (tail.last_t - started) / rnd
            if math.isfinite(per):
                eta = per * max(0, rounds - rnd)
        error = shown.reason if state in ("unreadable", "lost") else (status.get("error") or "")
        if state == "lost" and tail.ended:
            error = lost_reason(shown, {"state": tail.ended, "reason": tail.end_reason})
        return RunRow(
            id=name, path=path, recipe=str(status.get("recipe") or name.rsplit("-", 3)[0]), state=state,
            round=rnd, rounds=rounds, eta_s=eta, train_loss=tail.train_loss, val_name=tail.val_name,
            val_value=tail.val_value, test_name=tail.test_name, test_value=tail.test_value,
            gpu=str(status.get("gpu") or ""), started=number(status.get("started")), ended=number(status.get("ended")),
            pid=status.get("pid"), host=str(status.get("host") or ""), error=str(error),
            exit_code=status.get("exit_code"), holder=shown.holder or "", note=tail.note,
            name=seen.annotations[0], tags=tuple(seen.annotations[1]), notes=seen.annotations[2],
            config=pick_values(seen.config or {}, self.config_keys))

    def _merge_jobs(self, jobs: list[Job], result: RefreshResult) -> None:
        wanted: dict[str, RunRow] = {}
        for job in jobs:
            if job.run_dir and Path(job.run_dir).name in self.rows:
                continue
            if job.run_dir and job.state == "started":
                continue  # its directory will show at the next refresh
            key = f"job:{job.id}"
            state = {"queued": "queued", "starting": "starting", "error": "error"}.get(job.state, job.state)
            wanted[key] = RunRow(id=key, path=None, recipe=job.spec.label or Path(job.spec.recipe).stem,
                                 state=state, gpu=job.slot.removeprefix("gpu") if job.slot.startswith("gpu") else
                                 (job.slot or ""), started=job.submitted, error=job.error, job_id=job.id)
        for key in [k for k in self._jobs if k not in wanted]:
            self._drop(key)
            result.removed.add(key)
        for key, row in wanted.items():
            old = self.rows.get(key)
            if old is None:
                result.added.add(key)
            elif old != row:
                result.changed.add(key)
            if old != row:
                self._put(key, row)
        self._jobs = set(wanted)

    # --- view
    def matches(self, row: RunRow) -> bool:
        """Does the row pass the state filter and the text filter? Every word must occur in the id, display
        name, recipe, state, GPU, error, tags or notes; `tag:X` asks for the tag X, `state:X` for the state X."""
        states = STATE_FILTERS.get(self.state_filter)
        if states is not None and row.state not in states:
            return False
        words = self.filter_text.lower().split()
        if not words:
            return True
        hay = None
        for word in words:
            kind, _, want = word.partition(":")
            if kind == "tag" and want:
                if want not in (t.lower() for t in row.tags):
                    return False
            elif kind == "state" and want:
                if not row.state.startswith(want):
                    return False
            else:
                if hay is None:
                    hay = " ".join((row.id, row.display, row.recipe, row.state, row.gpu, row.error, *row.tags,
                                    row.notes)).lower()
                if word not in hay:
                    return False
        return True

    def view(self) -> list[RunRow]:
        """The rows that pass the filters, sorted: missing values last whatever the direction, ties by id."""
        column = self.sort_column
        keyed = [(row.sort_value(column), row) for row in self.rows.values() if self.matches(row)]
        present = sorted((k for k in keyed if k[0][0] == 0), key=lambda k: k[1].id)
        present.sort(key=lambda k: k[0], reverse=self.sort_reverse)
        missing = sorted((k for k in keyed if k[0][0] == 1), key=lambda k: k[1].id)
        return [row for _, row in present + missing]

    def sort_by(self, column: str, reverse: bool | None = None) -> None:
        if column not in COLUMNS and column.removeprefix("cfg:") not in self.config_keys:
            raise ValueError(f"unknown column {column!r}; one of {', '.join(COLUMNS)}")
        if reverse is None:
            reverse = not self.sort_reverse if column == self.sort_column else column in ("started", "progress")
        self.sort_column, self.sort_reverse = column, reverse

    def cycle_sort(self) -> str:
        index = (COLUMNS.index(self.sort_column) + 1) % len(COLUMNS) if self.sort_column in COLUMNS else 0
        self.sort_by(COLUMNS[index])
        return self.sort_column

    def cycle_state_filter(self) -> str:
        names = list(STATE_FILTERS)
        self.state_filter = names[(names.index(self.state_filter) + 1) % len(names)]
        return self.state_filter

    def counts(self) -> dict[str, int]:
        return dict(self.tally.counts)

    def live_runs(self) -> list[tuple[str, str]]:
        """(run_dir, gpu) of the runs whose process is alive here (for the runner's slot accounting)."""
        return list(self.tally.live.values())
