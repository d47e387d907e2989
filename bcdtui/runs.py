"""The runs table as data: one `RunRow` per run directory (plus launches that have no directory yet), refreshed
incrementally, sorted and filtered. The DataTable on the runs screen only mirrors `RunsModel.view()`.

A refresh stats each run's status.json and metrics.jsonl and re-reads only what changed: status.json (a few
hundred bytes) and the last few KiB of metrics.jsonl (`tailer.read_tail`). A run whose status says running but
whose process is gone (on this host) and holds no writer lock is "lost"; a run whose status.json cannot be read
is "unreadable" with the reason (bcdcore.rundir.run_state: one rule for every reader).
"""
from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from bcdcore.rundir import RunState, lost_reason, printable, read_status_checked, run_state
from bcdcore.scheduler import is_zombie, reap_pid
from bcdtui.cluster import run_entries
from bcdtui.runner import Job
from bcdtui.tailer import TailSummary, number, read_tail

STATE_ORDER = {"starting": 0, "queued": 1, "running": 2, "lost": 3, "error": 4, "unreadable": 5, "failed": 6,
               "killed": 7, "finished": 8, "unknown": 9}
ACTIVE = frozenset({"queued", "starting", "running"})
PROBLEMS = frozenset({"failed", "killed", "lost", "error", "unreadable"})
# name -> the states it shows (None = all); `f` on the runs screen cycles through them in this order
STATE_FILTERS: dict[str, frozenset | None] = {
    "all": None, "active": ACTIVE, "finished": frozenset({"finished"}), "problems": PROBLEMS}

_ENDED = frozenset({"finished", "failed", "killed"})
COLUMNS = ("run", "state", "progress", "round", "eta", "train_loss", "val", "gpu", "started", "recipe")
COLUMN_TITLES = {"run": "run", "state": "state", "progress": "progress", "round": "round", "eta": "ETA",
                 "train_loss": "train loss", "val": "val", "gpu": "GPU", "started": "started (UTC)",
                 "recipe": "recipe"}


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

    @property
    def progress(self) -> float:
        return min(1.0, self.round / self.rounds) if self.rounds else 0.0

    def sort_value(self, column: str):
        value = {
            "run": self.id, "recipe": self.recipe, "state": STATE_ORDER.get(self.state, 9),
            "progress": self.progress, "round": self.round, "eta": self.eta_s, "train_loss": self.train_loss,
            "val": self.val_value, "gpu": self.gpu, "started": self.started,
        }[column]
        if isinstance(value, float) and math.isnan(value):
            return (1, 0.0)  # missing values sort last
        return (0, value)


# ----------------------------------------------------------------------------------------------------------
# formatting (shared by the table and the headless twin)

def fmt_number(value: float, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "" if value is None or math.isnan(value) else str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def fmt_duration(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def fmt_time(t: float) -> str:
    if t is None or not math.isfinite(t):
        return ""
    try:
        return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%m-%d %H:%M")
    except (OverflowError, ValueError, OSError):  # a time past what a datetime holds
        return ""


def progress_bar(fraction: float, width: int = 8) -> str:
    fraction = max(0.0, min(1.0, fraction))
    full = int(fraction * width)
    part = "▏▎▍▌▋▊▉"[int((fraction * width - full) * 7)] if full < width and fraction * width - full >= 1 / 7 else ""
    bar = "█" * full + part
    return f"{bar:<{width}} {fraction * 100:3.0f}%"


def row_cells(row: RunRow) -> dict[str, str]:
    """The text of each column for one row."""
    val = ""
    if row.val_name:
        val = f"{row.val_name.removeprefix('val_')} {fmt_number(row.val_value)}"
    state = row.state
    if state == "unreadable":  # the reason in full is in the run's detail and in the filter's haystack
        state = f"unreadable: {row.error}" if len(row.error) <= 40 else f"unreadable: {row.error[:39]}…"
    return {
        "run": printable(f"⧗ {row.recipe}" if row.job_id else row.id),
        "state": state,
        "progress": progress_bar(row.progress) if row.rounds else "",
        "round": f"{row.round}/{row.rounds}" if row.rounds else "",
        "eta": fmt_duration(row.eta_s) if row.state == "running" else "",
        "train_loss": fmt_number(row.train_loss),
        "val": val,
        "gpu": printable(row.gpu) or ("cpu" if row.path is not None and row.state != "unknown" else ""),
        "started": fmt_time(row.started),
        "recipe": printable(row.recipe),  # from status.json, or a saved launch's label: shown, never obeyed
    }


# ----------------------------------------------------------------------------------------------------------
# the model

@dataclass
class _Seen:
    status_sig: tuple = ()
    metrics_sig: tuple = ()
    status: dict = field(default_factory=dict)
    problem: str = ""  # why status.json cannot be read ("" when it can)
    tail: TailSummary = field(default_factory=TailSummary)


def _sig(path: str) -> tuple:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    except OSError:  # there but not statable (a link loop...): a run whose status shows as unreadable
        try:
            st = os.lstat(path)
        except OSError:
            return ()
        return ("broken", st.st_mtime_ns, st.st_ino)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _events_only(base: str) -> tuple:
    """A directory with events but no status.json: a run whose status was lost (it shows as unreadable).
    An empty stream is a run being created (its status comes a moment later): not shown yet."""
    sig = _sig(base + "metrics.jsonl")
    return ("no status",) if sig and sig[0] != "broken" and sig[1] > 0 else ()


@dataclass
class RefreshResult:
    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)

    @property
    def any(self) -> bool:
        return bool(self.added or self.removed or self.changed)


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
        self._host = socket.gethostname()
        self._exited: set[str] = set()

    # --- refresh
    def refresh(self, jobs: list[Job] | None = None) -> RefreshResult:
        """Re-read what changed on disk; `jobs` (the runner's) adds rows for launches without a directory and
        tells which runs' processes have exited."""
        result = RefreshResult()
        self._mark_exited(jobs)
        present: set[str] = set()
        entries = run_entries(self.runs_dir)  # with the runs grouped in sweep directories (local or cluster)
        sep = os.sep
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            base = entry.path + sep  # plain strings: this loop runs for every run four times a second
            status_sig = _sig(base + "status.json") or _events_only(base)
            if not status_sig:
                continue  # not a run directory (or not yet)
            present.add(name)
            seen = self._seen.get(name)
            if seen is None:
                seen = self._seen[name] = _Seen()
            if status_sig == seen.status_sig and seen.status.get("state") in _ENDED:
                metrics_sig = seen.metrics_sig  # an ended run's events do not change until its status does
            else:
                metrics_sig = _sig(base + "metrics.jsonl")
            dirty = False
            row = self.rows.get(name)
            path = row.path if row is not None and row.path is not None else Path(entry.path)
            if status_sig != seen.status_sig:
                seen.status, seen.problem = read_status_checked(path)
                seen.status_sig, dirty = status_sig, True
            if metrics_sig != seen.metrics_sig:
                seen.metrics_sig, seen.tail, dirty = metrics_sig, read_tail(path), True
            state = self._state(seen.status, name, path, seen.problem)
            if row is None or dirty or row.state != state.state or row.holder != (state.holder or ""):
                new = self._row(name, path, seen, state)
                if row is None:
                    result.added.add(name)
                elif new != row:
                    result.changed.add(name)
                self.rows[name] = new
        for name in [n for n, r in self.rows.items() if r.job_id == "" and n not in present]:
            del self.rows[name]
            self._seen.pop(name, None)
            result.removed.add(name)
        if jobs is not None:
            self._merge_jobs(jobs, result)
        return result

    def _mark_exited(self, jobs: list[Job] | None) -> None:
        self._exited = {Path(j.run_dir).name for j in jobs or () if j.run_dir and j.state == "exited"}

    def _state(self, status: dict, name: str = "", path: Path | None = None, problem: str = "") -> RunState:
        shown = run_state(status, path, problem)
        state = shown.state
        if state in ("queued", "running") and name in self._exited and shown.holder is None:
            return RunState("lost", "our launch exited without writing its end state")
        if state == "running" and status.get("host") == self._host and is_zombie(status.get("pid")):
            reap_pid(status.get("pid"))  # our own exited child: collect it, then it reads as gone
            shown = run_state(status, path, problem)
            if shown.state == "running" and is_zombie(status.get("pid")) and shown.holder is None:
                return RunState("lost", "its process exited without writing its end state")
        return shown

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
            exit_code=status.get("exit_code"), holder=shown.holder or "", note=tail.note)

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
        for key in [k for k, r in self.rows.items() if r.job_id and k not in wanted]:
            del self.rows[key]
            result.removed.add(key)
        for key, row in wanted.items():
            old = self.rows.get(key)
            if old is None:
                result.added.add(key)
            elif old != row:
                result.changed.add(key)
            self.rows[key] = row

    # --- view
    def matches(self, row: RunRow) -> bool:
        """Does the row pass the state filter and the text filter (every word must occur)?"""
        states = STATE_FILTERS.get(self.state_filter)
        if states is not None and row.state not in states:
            return False
        words = self.filter_text.lower().split()
        if words:
            hay = " ".join((row.id, row.recipe, row.state, row.gpu, row.error)).lower()
            return all(w in hay for w in words)
        return True

    def view(self) -> list[RunRow]:
        out = [row for row in self.rows.values() if self.matches(row)]
        # missing values last whatever the direction; ties by id for a stable order
        present = [r for r in out if r.sort_value(self.sort_column)[0] == 0]
        missing = [r for r in out if r.sort_value(self.sort_column)[0] == 1]
        present.sort(key=lambda r: r.id)
        present.sort(key=lambda r: r.sort_value(self.sort_column), reverse=self.sort_reverse)
        missing.sort(key=lambda r: r.id)
        return present + missing

    def sort_by(self, column: str, reverse: bool | None = None) -> None:
        if column not in COLUMNS:
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
        out: dict[str, int] = {}
        for row in self.rows.values():
            out[row.state] = out.get(row.state, 0) + 1
        return out

    def live_runs(self) -> list[tuple[str, str]]:
        """(run_dir, gpu) of the runs whose process is alive here (for the runner's slot accounting)."""
        return [(str(r.path), r.gpu) for r in self.rows.values()
                if r.path is not None and r.host in ("", self._host)
                and (r.state == "running" or (r.state == "queued" and r.pid))]
