"""The run directory: writer (one per run) and readers (CLI, plots, TUI). No torch here.

Layout and the event stream (version 1) follow DESIGN.md "Run directory". Writers never overwrite another
run's files: a run directory is created exclusively, and two runs of one recipe in the same second get a
`-2`, `-3`, ... suffix.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bcdcore.runlock import LOCK_FILE, RunLock, RunLockedError, lock_holder  # noqa: F401 (re-exported)

EVENT_VERSION = 1
STATES = ("queued", "running", "finished", "failed", "killed")
CSV_COLUMNS = ("round", "grad_evals", "flops", "samples", "bytes_comm", "wall_s", "train_loss",
               "val_loss", "val_acc", "test_loss", "test_acc",
               "bytes_round", "comm_sim_s", "sim_time_s")  # the last three: distributed runs only


def default_runs_dir() -> Path:
    return Path(os.environ.get("BCD_RUNS", "runs"))


def run_id_for(name: str, digest: str, when: float | None = None) -> str:
    stamp = datetime.fromtimestamp(time.time() if when is None else when, tz=timezone.utc)
    return f"{name}-{stamp:%Y%m%d-%H%M%S}-{digest[:6]}"


_RUN_ID = re.compile(r"(?P<name>.+)-(?P<time>\d{8}-\d{6})-(?P<digest>[0-9a-f]{6})(?P<copy>-\d+)?")


def display_id(run_id: str, display_name: str = "") -> str:
    """The short id readers show: name + the digest's 6 hex (+ `-2` for a second copy), without the start time
    (`started` shows it); a display name the user gave the run replaces the recipe's name. An id in another
    form is shown as it is."""
    match = _RUN_ID.fullmatch(run_id)
    if match is None:
        return display_name or run_id
    return f"{display_name or match['name']}-{match['digest']}{match['copy'] or ''}"


def id_time(run_id: str) -> str:
    """The start time a run id carries ("YYYYmmdd-HHMMSS", which sorts as time does), "" for an id in another
    form: a reader's order of reading many runs, newest first, before their status.json is read."""
    match = _RUN_ID.fullmatch(run_id)
    return match["time"] if match is not None else ""


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def json_safe(value: Any) -> Any:
    """JSON has no nan/inf: non-finite floats are written as strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` through a temporary file and a rename: readers and a later resume see the old
    file or the new one, never a part. On any failure (a full disk) the temporary file is removed and the
    old file is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _json_bytes(data: dict) -> bytes:
    return json.dumps(json_safe(data), indent=1, default=_json_default).encode()


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, _json_bytes(data))


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """Last resort when a full disk refuses a new file: overwrite the existing one. Its blocks are already
    allocated, so a status of a few hundred bytes still fits where a temporary file does not."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def unique_dir(parent: Path, base: str, attempts: int = 999) -> Path:
    """Create and return `parent/base`, or `base-2`, `base-3`, ... when taken: never a directory that exists
    (mkdir is the atomic test, so two processes never get the same one)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        path = parent / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a new directory {base} under {parent}")


class RunDir:
    """Writes one run's directory, holding its writer lock (RUN_DIR/lock) from `create` or `open` until
    `close`. Create with `RunDir.create` (new run) or `RunDir.open` (resume, or a launcher's final record)."""

    def __init__(self, path: Path, lock: "RunLock | None" = None) -> None:
        self.path = Path(path)
        self.run_id = self.path.name
        self.lock = lock
        self._events = self._csv_file = self._csv = None  # opened at the first event: opening writes nothing

    def _open_streams(self) -> None:
        self._events = open(self.path / "metrics.jsonl", "a", buffering=1)
        csv_path = self.path / "metrics.csv"
        new_csv = not csv_path.exists()
        self._csv_file = open(csv_path, "a", newline="", buffering=1)
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()

    @classmethod
    def create(cls, runs_dir: Path, name: str, digest: str, recipe_toml: str) -> "RunDir":
        """A new run directory under runs_dir, never one that exists. OSError (a runs directory that is a
        file, read-only, a full disk) propagates for the caller to phrase; nothing half-made is left."""
        path = unique_dir(Path(runs_dir), run_id_for(name, digest))
        try:
            run = cls(path, RunLock(path).acquire())
            write_bytes_atomic(path / "recipe.toml", recipe_toml.encode())
            run.write_status(state="queued", run_id=run.run_id, recipe=name, progress={"round": 0, "rounds": 0})
        except BaseException:
            _remove_tree(path)  # a directory without its status would be a run nobody can read
            raise
        return run

    @classmethod
    def open(cls, path: Path, lock: bool = True) -> "RunDir":
        """An existing run directory, for its one writer. `lock=False` only where the caller's process
        (the distributed launcher) already holds the lock. A second writer gets RunLockedError."""
        path = Path(path)
        held = RunLock(path).acquire() if lock else None
        run = cls(path, held)
        if lock:
            run._remove_stale_temporaries()
        return run

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of a writer that was killed mid-write (it held the lock, which we hold now)."""
        try:
            for p in self.path.glob(".*.tmp"):
                p.unlink(missing_ok=True)
        except OSError:
            pass

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def write_status(self, **fields: Any) -> dict:
        status = read_status(self.path)
        status.update(fields)
        status.setdefault("host", socket.gethostname())
        data = _json_bytes(status)
        try:
            write_bytes_atomic(self.path / "status.json", data)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            _rewrite_in_place(self.path / "status.json", data)
        return status

    def event(self, kind: str, **fields: Any) -> dict:
        record = {"v": EVENT_VERSION, "kind": kind, "t": time.time(), **fields}
        line = json.dumps(json_safe(record), default=_json_default) + "\n"
        try:
            if self._events is None:
                self._open_streams()
            self._events.write(line)
            if kind == "metric":
                self._csv.writerow({k: ("" if fields.get(k) is None else fields[k]) for k in CSV_COLUMNS})
        except OSError as exc:
            exc.filename = exc.filename or str(self.path / "metrics.jsonl")
            raise
        return record

    def drop_events_after(self, round_: int) -> int:
        """Resume after a crash: the events of rounds later than the checkpoint's (and a torn last line)
        are dropped from metrics.jsonl, and metrics.csv is rebuilt from what stays, so every round appears
        once in every mirror. Atomic: a failure leaves both files as they were. Returns the lines dropped."""
        kept, dropped = [], 0
        try:
            data = (self.path / "metrics.jsonl").read_bytes()
        except FileNotFoundError:
            data = b""
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                dropped += 1
                continue
            later = (isinstance(event, dict) and isinstance(event.get("round"), int)
                     and not isinstance(event.get("round"), bool) and event["round"] > round_)
            if not isinstance(event, dict) or later:
                dropped += 1
                continue
            kept.append((line, event))
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for _, e in kept:
            if e.get("kind") == "metric":
                writer.writerow({k: ("" if e.get(k) is None else e[k]) for k in CSV_COLUMNS})
        if self._events is not None:
            self.close_streams()
        write_bytes_atomic(self.path / "metrics.jsonl", b"".join(line + b"\n" for line, _ in kept))
        write_bytes_atomic(self.path / "metrics.csv", table.getvalue().encode())
        return dropped

    def write_arrays(self) -> None:
        """arrays/<metric>.npy from the metric events (the last event of each round wins after a resume)."""
        import numpy as np

        table = metric_table(read_events(self.path))
        folder = self.path / "arrays"
        folder.mkdir(exist_ok=True)
        for name, values in table.items():
            buf = io.BytesIO()
            np.save(buf, np.asarray(values, dtype=np.float64))
            write_bytes_atomic(folder / f"{name}.npy", buf.getbuffer())

    def close_streams(self) -> None:
        for f in (self._events, self._csv_file):
            if f is not None:
                try:
                    f.close()
                except OSError:  # the last buffered line could not be written (a full disk): it is lost
                    pass
        self._events = self._csv_file = self._csv = None

    def close(self) -> None:
        self.close_streams()
        if self.lock is not None:
            self.lock.release()


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# readers: total. Any bytes in any file of a run directory read as typed records (bcdcore.records), a skipped
# and counted line, or a one-line reason; never an exception. The byte-level reading is bcdcore.runfiles
# (imported here, not at the top, to keep the reader half of this module in one place).

import stat  # noqa: E402
from dataclasses import dataclass  # noqa: E402

# re-exported (noqa: F401): bcdtui reaches bcdcore's readers through this module only (DESIGN.md "Module shape")
from bcdcore.records import RecordError, parse_event, plain, printable  # noqa: E402,F401
from bcdcore.runfiles import (  # noqa: E402,F401
    Events,
    EventTail,
    open_regular,
    read_complete_lines,
    read_events,
    read_file_bytes,
    read_recipe_dict,
    read_status_checked,
)

LIVE_STATES = ("queued", "running")


def read_status(path: Path) -> dict:
    """The checked status, or {} when status.json is missing or does not follow the schema."""
    return read_status_checked(path)[0]


def _number(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)  # float("nan") / float("inf") read back the strings written for non-finite values
    except (TypeError, ValueError, OverflowError):
        return math.nan


def metric_table(events: list[dict]) -> dict[str, list[float]]:
    """Metric events as columns (nan where a round lacks a value); one row per round, the last one wins."""
    rows: dict[int, dict] = {}
    for e in events:
        if isinstance(e, dict) and e.get("kind") == "metric":
            rnd = e.get("round")
            if isinstance(rnd, int) and not isinstance(rnd, bool):
                rows[rnd] = e
    ordered = [rows[r] for r in sorted(rows)]
    names = [c for c in CSV_COLUMNS if any(c in r for r in ordered)]
    return {name: [_number(r.get(name)) for r in ordered] for name in names}


def _is_run(path: Path) -> bool:
    """A run directory: it has a status.json (of any kind, even a broken link: it shows as unreadable), or
    events without one (a run whose status was lost). A new run's directory holds neither for a moment."""
    if os.path.lexists(path / "status.json"):
        return True
    try:
        return (path / "metrics.jsonl").stat().st_size > 0
    except OSError:
        return False


def _subdirs(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir()]
    except OSError:
        return []


def list_runs(runs_dir: Path) -> list[Path]:
    """Run directories under runs_dir, including those grouped inside sweep directories (sweep.json, whose
    content is not needed here). A runs directory that is missing, a file or unreadable has no runs."""
    found = []
    for p in _subdirs(Path(runs_dir)):
        if _is_run(p):
            found.append(p)
        elif os.path.lexists(p / "sweep.json"):
            found.extend(q for q in _subdirs(p) if _is_run(q))
    return sorted(found)


def pid_alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2 ** 31:
        return False  # never kill(0) or kill(-n): those address process groups
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:  # an exited child nobody has reaped yet still answers kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError, ValueError):
        return True


@dataclass(frozen=True)
class RunState:
    """What a reader shows for a run: `state` (one of records.STATES, or "lost", "unreadable", "unknown"),
    why when it is lost or unreadable, and the host:pid holding the writer lock (None when nobody does)."""

    state: str
    reason: str = ""
    holder: str | None = None

    @property
    def label(self) -> str:
        return f"unreadable: {self.reason}" if self.state == "unreadable" else self.state


def _writer(path: Path) -> str | None:
    """`lock_holder`, safe for readers of any run directory: only a regular lock file is probed (opening a
    FIFO named `lock` would block), and the holder as written in the file is shown printable and short."""
    try:
        if not stat.S_ISREG(os.lstat(Path(path) / LOCK_FILE).st_mode):
            return None
    except OSError:
        return None
    holder = lock_holder(path)
    return None if holder is None else printable(holder)[:120]


def run_state(status: dict, path: Path | None = None, problem: str = "") -> RunState:
    """The one rule for a run's displayed state, from its status, its process and its writer lock.

    A status that could not be read (`problem`) is "unreadable". A queued or running run whose lock nobody
    holds and whose pid is gone on this host is "lost" (its writer died before recording an end). The lock is
    probed (with `path`) only for live or unreadable runs: an ended run's lock tells nothing new."""
    state = status.get("state", "unknown") if isinstance(status, dict) else "unknown"
    holder = _writer(path) if path is not None and (problem or state in LIVE_STATES) else None
    if problem:
        return RunState("unreadable", problem, holder)
    pid = status.get("pid")
    if (state == "running" or (state == "queued" and pid is not None)) and holder is None \
            and status.get("host") == socket.gethostname() and not pid_alive(pid):
        return RunState("lost", f"its process {status.get('host')}:{pid} died without an end event "
                                "and holds no writer lock")
    return RunState(str(state), "", holder)


def lost_reason(shown: RunState, end: dict | None) -> str:
    """A lost run's reason, with what its last end event says when the writer got that far (a full disk can
    take the final status.json write but not the event before it)."""
    if shown.state != "lost" or not end:
        return shown.reason
    said = f"{end.get('state')}: {end['reason']}" if end.get("reason") else str(end.get("state"))
    return f"{shown.reason}; its last event says {said}"


def effective_state(status: dict, path: Path | None = None) -> str:
    """The state a reader shows (see `run_state`); without `path` the lock is not consulted."""
    return run_state(status, path).state
