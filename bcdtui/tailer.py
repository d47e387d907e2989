"""Incremental readers of one run directory: the event stream and the log, by byte offsets.

`RunFollower` is what the run screen holds while it is open: each `poll()` reads only the bytes appended since
the last call (bcdcore.rundir.EventTail for metrics.jsonl, `TextTail` for log.txt) and folds the new events
into columns, the latest round's block events and the latest measurements. Nothing here imports Textual.
`read_tail` is the cheap reader the runs table uses: the last few KiB of metrics.jsonl, never the whole file.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcdcore.rundir import (
    EventTail,
    RecordError,
    open_regular,
    parse_event,
    printable,
    read_complete_lines,
    read_status_checked,
)

X_AXES = ("round", "grad_evals", "wall_s", "samples", "flops")
METRIC_COLUMNS = ("round", "grad_evals", "flops", "samples", "bytes_comm", "wall_s", "train_loss", "val_loss", "val_acc",
                  "test_loss", "test_acc")


def number(value: Any) -> float:
    """An event value as a float; the strings "nan"/"inf" the engine writes for non-finite numbers too."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


class TextTail:
    """Complete lines appended to a text file since the last `poll()`; a partial last line waits."""

    def __init__(self, path: Path, max_initial_bytes: int = 256 * 1024) -> None:
        self.path = Path(path)
        self.offset = 0
        self.max_initial_bytes = max_initial_bytes
        self._first = True

    def poll(self) -> list[str]:
        if self._first:
            try:
                self.offset = self._first_offset()
            except (OSError, RecordError):
                return []  # no log yet (or a FIFO, a directory...): decide where to start once there is one
            self._first = False
        text, self.offset = read_complete_lines(self.path, self.offset)
        # printable: an ESC in a log line must not reach the terminal (the log is any bytes, like every file)
        return [printable(line.expandtabs()) for line in text.splitlines()]

    def _first_offset(self) -> int:
        """0, or for a huge log the start of the first whole line of its last max_initial_bytes."""
        with os.fdopen(open_regular(self.path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= self.max_initial_bytes:
                return 0
            f.seek(size - self.max_initial_bytes)
            f.readline()
            return f.tell()


@dataclass
class Measurement:
    unit: str
    round: int
    value: Any
    figure: str = ""  # the figure file the unit wrote (relative to the run directory), if any
    extra: dict = field(default_factory=dict)  # the unit's further fields


@dataclass
class PollResult:
    events: int = 0
    metrics: bool = False
    blocks: bool = False
    measures: bool = False
    log_lines: list[str] = field(default_factory=list)
    ended: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.events or self.log_lines)


class RunFollower:
    """The live state of one run, folded from its events. Metric rows are keyed by round (after a resume the
    repeated rounds replace the earlier ones, as in bcdcore.rundir.metric_table)."""

    def __init__(self, run_dir: Path, max_log_lines: int = 2000) -> None:
        self.path = Path(run_dir)
        self.events = EventTail(self.path)
        self.log = TextTail(self.path / "log.txt")
        self.max_log_lines = max_log_lines
        self.rows: dict[int, dict[str, float]] = {}
        self._last_round = 0
        self._columns: dict[str, list[float]] | None = None
        self.start: dict = {}
        self.end: dict = {}
        self.blocks_round = 0
        self.blocks: dict[int, dict] = {}  # block index -> latest block event of the latest round
        self.measures: dict[str, Measurement] = {}  # unit -> latest measurement
        self.log_lines: list[str] = []
        self.status: dict = {}
        self.status_problem = ""  # why status.json cannot be read ("" when it can)
        self.last_event_t = 0.0
        self._restarts = 0

    def poll(self) -> PollResult:
        result = PollResult()
        events = self.events.poll()
        if self.events.restarts != self._restarts:  # the stream was rewritten (a resume dropped events)
            self._restarts = self.events.restarts
            self.rows, self._columns, self._last_round = {}, None, 0
            self.blocks_round, self.blocks, self.measures, self.start, self.end = 0, {}, {}, {}, {}
            result.metrics = result.blocks = result.measures = True
        for event in events:
            result.events += 1
            kind = event.get("kind")
            self.last_event_t = number(event.get("t")) or self.last_event_t
            if kind == "metric":
                try:
                    rnd = int(event["round"])
                except (KeyError, TypeError, ValueError):
                    continue
                row = {k: number(v) for k, v in event.items()
                       if k in METRIC_COLUMNS or k.startswith(("val_", "test_"))}
                self._add_row(rnd, row)
                result.metrics = True
            elif kind == "block":
                rnd = int(number(event.get("round")) if event.get("round") is not None else 0)
                if rnd > self.blocks_round:
                    self.blocks_round, self.blocks = rnd, {}
                if rnd == self.blocks_round:
                    self.blocks[int(number(event.get("block")))] = event
                    result.blocks = True
            elif kind == "measure":
                unit = str(event.get("unit", "?"))
                extra = {k: v for k, v in event.items()
                         if k not in ("v", "kind", "t", "unit", "round", "value", "figure", "path")}
                self.measures[unit] = Measurement(unit, int(number(event.get("round")) or 0), event.get("value"),
                                                  str(event.get("figure") or event.get("path") or ""), extra)
                result.measures = True
            elif kind == "start":
                self.start = event
                self.end = {}
            elif kind == "end":
                self.end = event
                result.ended = True
        lines = self.log.poll()
        if lines:
            self.log_lines.extend(lines)
            del self.log_lines[:-self.max_log_lines]
            result.log_lines = lines
        if result.changed or not self.status:
            self.refresh_status()
        return result

    @property
    def note(self) -> str:
        """What could not be read: bad event lines skipped, or why the stream cannot be read ("" if none)."""
        return self.events.note

    def _add_row(self, rnd: int, row: dict[str, float]) -> None:
        """Keep the columns current: a new last round is appended in place (the common, live case); a repeated
        round (after a resume) or a new metric name rebuilds them at the next read."""
        cols = self._columns
        if cols is not None and (not self.rows or rnd > self._last_round) and set(row) <= set(cols):
            for name, values in cols.items():
                values.append(row.get(name, math.nan))
        else:
            self._columns = None
        self.rows[rnd] = row
        self._last_round = max(self._last_round, rnd) if self.rows else rnd

    def refresh_status(self) -> dict:
        self.status, self.status_problem = read_status_checked(self.path)
        return self.status

    @property
    def columns(self) -> dict[str, list[float]]:
        """Metric columns in round order (nan where a round lacks a value)."""
        if self._columns is None:
            ordered = [self.rows[r] for r in sorted(self.rows)]
            names: list[str] = []
            for row in ordered:
                for key in row:
                    if key not in names:
                        names.append(key)
            self._columns = {n: [row.get(n, math.nan) for row in ordered] for n in names}
        return self._columns

    def metric_names(self) -> list[str]:
        """Metrics that can be charted (not the x axes), in a stable order: train_loss first."""
        cols = self.columns
        preferred = [m for m in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc") if m in cols]
        rest = sorted(k for k in cols if k not in preferred and k not in X_AXES and k != "bytes_comm")
        return preferred + rest

    def series(self, y: str, x: str = "round") -> tuple[list[float], list[float]]:
        cols = self.columns
        xs, ys = cols.get(x, []), cols.get(y, [])
        pairs = [(a, b) for a, b in zip(xs, ys) if math.isfinite(a) and math.isfinite(b)]
        return [a for a, _ in pairs], [b for _, b in pairs]

    def last_metrics(self) -> dict[str, float]:
        """The latest finite value of every metric."""
        out: dict[str, float] = {}
        for name, values in self.columns.items():
            for v in reversed(values):
                if math.isfinite(v):
                    out[name] = v
                    break
        return out

    def block_rows(self) -> list[dict]:
        return [self.blocks[i] for i in sorted(self.blocks)]


# ----------------------------------------------------------------------------------------------------------
# the runs table's cheap reader

@dataclass
class TailSummary:
    """What the runs table shows from a run's event stream, read from the file's last few KiB."""

    round: int | None = None
    train_loss: float = math.nan
    val_name: str = ""
    val_value: float = math.nan
    test_name: str = ""
    test_value: float = math.nan
    seconds_per_round: float = math.nan  # from the metric events in the window (for the ETA)
    last_t: float = math.nan
    ended: str = ""  # the end event's state, when the window holds it
    end_reason: str = ""
    bad_lines: int = 0  # lines in the window read that are not valid events (skipped)

    @property
    def note(self) -> str:
        n = self.bad_lines
        return f"{n} bad line{'s' if n > 1 else ''} in the last events" if n else ""


RATE_EVENTS = 8  # metric events (newest first) that the ETA's seconds-per-round is taken over


def read_tail(path: Path, window: int = 8192, max_window: int = 262144) -> TailSummary:
    """Summary of the last metric events of `path/metrics.jsonl`, reading `window` bytes from the end (and
    widening up to `max_window` until a metric event is found). Lines are walked newest first and only the
    ones that can matter are parsed (metric, start, end events; block events are skipped unparsed), so a
    runs table of 1,000 runs starts in a fraction of a second."""
    file = Path(path) / "metrics.jsonl"
    summary = TailSummary()
    try:
        f = os.fdopen(open_regular(file), "rb")
    except (OSError, RecordError):
        return summary
    with f:
        size = os.fstat(f.fileno()).st_size
        while True:
            start = max(0, size - window)
            f.seek(start)
            data = f.read(size - start)
            lines = data.split(b"\n")
            last_piece = lines[-1]  # empty, or a line still being written: not a bad line when it fails
            if start > 0:
                lines = lines[1:]  # the first line of the window is cut
            summary, metrics, done, bad = TailSummary(), [], False, 0
            boundary = False  # a start event: older metrics belong to an earlier segment (before a resume)
            for raw in reversed(lines):
                is_metric = b'"metric"' in raw
                if not is_metric and b'"end"' not in raw and b'"start"' not in raw:
                    continue
                if is_metric and len(metrics) >= RATE_EVENTS and b'"val_' not in raw:
                    continue  # the rate has its events: only the last evaluation is still looked for
                try:
                    event = parse_event(raw)
                except RecordError:
                    bad += raw is not last_piece
                    continue
                kind = event.get("kind")
                if kind == "metric" and not boundary:
                    if len(metrics) < RATE_EVENTS:
                        metrics.append(event)
                    if not summary.val_name:
                        for name in ("val_acc", "val_loss"):
                            if name in event and math.isfinite(number(event[name])):
                                summary.val_name, summary.val_value = name, number(event[name])
                                break
                    if summary.val_name and len(metrics) >= RATE_EVENTS:
                        done = True
                        break
                elif kind == "end" and not metrics and not summary.ended and not boundary:
                    summary.ended, summary.end_reason = str(event.get("state", "")), str(event.get("reason", ""))
                elif kind == "start":
                    boundary = True
                    if metrics:
                        break
            if done or metrics or start == 0 or window >= max_window:
                if not summary.val_name and not done and start > 0 and window < max_window and metrics:
                    window *= 4  # the last evaluation is further back
                    continue
                break
            window *= 4
    summary.bad_lines = bad
    if not metrics:
        return summary
    last = metrics[0]
    summary.round = int(number(last.get("round")) or 0)
    summary.train_loss = number(last.get("train_loss"))
    summary.last_t = number(last.get("t"))
    for name in ("test_acc", "test_loss"):
        if name in last and math.isfinite(number(last[name])):
            summary.test_name, summary.test_value = name, number(last[name])
            break
    if len(metrics) >= 2:
        oldest = metrics[-1]
        d_round = number(last.get("round")) - number(oldest.get("round"))
        d_t = number(last.get("t")) - number(oldest.get("t"))
        if d_round > 0 and math.isfinite(d_t) and d_t >= 0:
            summary.seconds_per_round = d_t / d_round
    return summary


# ----------------------------------------------------------------------------------------------------------
# what the runs model stats

def file_sig(path: str) -> tuple:
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


def events_only_sig(base: str) -> tuple:
    """A directory with events but no status.json: a run whose status was lost (it shows as unreadable).
    An empty stream is a run being created (its status comes a moment later): not shown yet."""
    sig = file_sig(base + "metrics.jsonl")
    return ("no status",) if sig and sig[0] != "broken" and sig[1] > 0 else ()
