"""The run directory: writer (one per run) and readers (CLI, plots, TUI). No torch here.

Layout and the event stream (version 1) follow DESIGN.md "Run directory". Writers never overwrite another
run's files: a run directory is created exclusively, and two runs of one recipe in the same second get a
`-2`, `-3`, ... suffix.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import json
import math
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

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


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """JSON has no nan/inf: non-finite floats are written as strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(_finite(data), f, indent=1, default=_json_default)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RunDir:
    """Writes one run's directory. Create with `RunDir.create` (new run) or `RunDir.open` (resume)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.run_id = self.path.name
        self._events = open(self.path / "metrics.jsonl", "a", buffering=1)
        csv_path = self.path / "metrics.csv"
        new_csv = not csv_path.exists()
        self._csv_file = open(csv_path, "a", newline="", buffering=1)
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()

    @classmethod
    def create(cls, runs_dir: Path, name: str, digest: str, recipe_toml: str) -> "RunDir":
        runs_dir = Path(runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        base = run_id_for(name, digest)
        for attempt in range(1, 1000):
            path = runs_dir / (base if attempt == 1 else f"{base}-{attempt}")
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise RuntimeError(f"could not create a new run directory under {runs_dir}")
        (path / "recipe.toml").write_text(recipe_toml)
        run = cls(path)
        run.write_status(state="queued", run_id=run.run_id, recipe=name, progress={"round": 0, "rounds": 0})
        return run

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        return cls(Path(path))

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
        write_json_atomic(self.path / "status.json", status)
        return status

    def event(self, kind: str, **fields: Any) -> dict:
        record = {"v": EVENT_VERSION, "kind": kind, "t": time.time(), **fields}
        self._events.write(json.dumps(_finite(record), default=_json_default) + "\n")
        if kind == "metric":
            self._csv.writerow({k: ("" if fields.get(k) is None else fields[k]) for k in CSV_COLUMNS})
        return record

    def write_arrays(self) -> None:
        """arrays/<metric>.npy from the metric events (the last event of each round wins after a resume)."""
        import numpy as np

        table = metric_table(read_events(self.path))
        folder = self.path / "arrays"
        folder.mkdir(exist_ok=True)
        for name, values in table.items():
            np.save(folder / f"{name}.npy", np.asarray(values, dtype=np.float64))

    def close(self) -> None:
        self._events.close()
        self._csv_file.close()


# ----------------------------------------------------------------------------------------------------------
# the writer's lock: one process at a time writes a run directory

LOCK_FILE = "lock"


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock (the message names its host:pid)."""


class RunLock:
    """An exclusive `flock` on RUN_DIR/lock, held for as long as a process writes the run. The file holds the
    holder's `host:pid`; the lock, not the file, is what counts (the kernel drops it when the holder dies,
    however it dies, so a stale file never blocks anyone)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, wait_s: float = 1.0) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s  # readers probe with a shared lock for microseconds: retry a while
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise RunLockedError(f"{self.path.parent}: another process writes this run "
                                             f"({holder or 'holder unknown'}); wait for it or kill it first") from None
                    raise
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode("utf-8", errors="replace").strip()
    except OSError:
        return ""


def lock_holder(path: Path) -> str | None:
    """`host:pid` of the process that holds the run directory's writer lock, or None when nobody does.
    Probes with a shared lock that it drops at once; never raises."""
    try:
        fd = os.open(Path(path) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(fd) or "unknown holder"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# readers

def read_status(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _parse_lines(text: str) -> Iterator[dict]:
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:
            continue  # a torn line (the writer was killed mid-write, or is writing it now)


def read_events(path: Path, kind: str | None = None) -> list[dict]:
    """All events of a run; a torn (partial) line is skipped."""
    try:
        text = (Path(path) / "metrics.jsonl").read_text()
    except OSError:
        return []
    return [e for e in _parse_lines(text) if kind is None or e.get("kind") == kind]


def read_complete_lines(path: Path, offset: int) -> tuple[str, int]:
    """The text of the complete lines of `path` from byte `offset` on, and the offset just past them.

    A last line without its newline is still being written: it is left for the next read rather than torn.
    An unreadable (e.g. not yet created) file reads as no text, with the offset unchanged. Shared by the
    incremental readers here and in bcdtui.tailer, so that they agree on what a complete line is."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return "", offset
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8", errors="replace"), offset + end


class EventTail:
    """Incremental reader: each `poll()` returns only events appended since the last call, and never
    consumes a line that is not yet complete."""

    def __init__(self, path: Path) -> None:
        self.file = Path(path) / "metrics.jsonl"
        self.offset = 0

    def poll(self) -> list[dict]:
        text, self.offset = read_complete_lines(self.file, self.offset)
        return list(_parse_lines(text))


def _number(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)  # float("nan") / float("inf") read back the strings written for non-finite values


def metric_table(events: list[dict]) -> dict[str, list[float]]:
    """Metric events as columns (nan where a round lacks a value); one row per round, the last one wins."""
    rows: dict[int, dict] = {}
    for e in events:
        if e.get("kind") == "metric":
            rows[int(e["round"])] = e
    ordered = [rows[r] for r in sorted(rows)]
    names = [c for c in CSV_COLUMNS if any(c in r for r in ordered)]
    return {name: [_number(r.get(name)) for r in ordered] for name in names}


def list_runs(runs_dir: Path) -> list[Path]:
    """Run directories under runs_dir, including those grouped inside sweep directories (sweep.json)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = []
    for p in runs_dir.iterdir():
        if (p / "status.json").is_file():
            found.append(p)
        elif (p / "sweep.json").is_file():
            found.extend(q for q in p.iterdir() if (q / "status.json").is_file())
    return sorted(found)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child nobody has reaped yet still answers kill(pid, 0)
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def effective_state(status: dict) -> str:
    """The state a reader should show: a "running" run whose process is gone is "lost"."""
    state = status.get("state", "unknown")
    if state == "running" and status.get("host") == socket.gethostname() and not pid_alive(status.get("pid")):
        return "lost"
    return state
