"""The writer's lock: one process at a time writes a run directory (an flock on RUN_DIR/lock, naming
host:pid). No torch; readers probe it with `lock_holder`."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

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
