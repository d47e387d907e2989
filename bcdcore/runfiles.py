"""Total reading of a run directory's files: whatever bytes, links, directories or FIFOs lie where a file should
be, these functions return checked records (bcdcore.records), a count of skipped lines, or a one-line reason;
they never raise on content and never block. bcdcore.rundir re-exports them: readers elsewhere (bcdtui
included) reach them through that module. No torch here.
"""
from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

from bcdcore.recipe import os_reason
from bcdcore.records import MAX_LINE_BYTES, MAX_STATUS_BYTES, RecordError, parse_event, parse_status, plain, printable

MAX_RECIPE_BYTES = 4 << 20
CHUNK_BYTES = MAX_LINE_BYTES + 1  # the most an incremental reader takes in one read


def open_regular(path: Path) -> int:
    """A read-only descriptor of a regular file. A FIFO, socket, device or directory in a file's place is
    refused (RecordError) rather than read: opening a FIFO would block a reader forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise RecordError("is a directory" if stat.S_ISDIR(mode) else "is not a regular file")
    return fd


def read_file_bytes(path: Path, limit: int, offset: int = 0) -> bytes:
    """At most `limit` bytes of a regular file from `offset`. Raises OSError or RecordError."""
    fd = open_regular(path)
    try:
        # not `limit` at once: pread allocates what it is asked for, and limits are far above typical sizes
        return os.pread(fd, min(limit, max(0, os.fstat(fd).st_size - offset) + 4096), offset)
    finally:
        os.close(fd)


def _read_bounded(file: Path, limit: int) -> tuple[bytes, str]:
    """(the bytes of a run's small file, "") or (b"", why it cannot be read): missing (or a broken link), an
    OS error, not a regular file, or larger than `limit` bytes; the reason names the file."""
    name = file.name
    try:
        raw = read_file_bytes(file, limit + 1)
    except FileNotFoundError:
        return b"", f"{name} is a broken symbolic link" if os.path.islink(file) else f"no {name}"
    except OSError as exc:
        return b"", f"{name}: {os_reason(exc, with_path=False)}"
    except RecordError as exc:
        return b"", f"{name} {exc}"
    if len(raw) > limit:
        return b"", f"{name}: larger than {limit} bytes"
    return raw, ""


def read_status_checked(path: Path) -> tuple[dict, str]:
    """(status, "") for a run whose status.json follows the schema, else ({}, the reason it cannot be read)."""
    raw, problem = _read_bounded(Path(path) / "status.json", MAX_STATUS_BYTES)
    if problem:
        return {}, problem
    if not raw.strip():
        return {}, "status.json is empty"
    try:
        return parse_status(raw), ""
    except RecordError as exc:
        return {}, str(exc)


def read_recipe_dict(path: Path) -> tuple[dict, str]:
    """(the run's resolved recipe.toml as a dict, "") or ({}, why it cannot be read): not UTF-8, not TOML,
    nested deeper than records.MAX_DEPTH, a directory... It is not validated as a recipe here: readers only
    show and compare it."""
    raw, problem = _read_bounded(Path(path) / "recipe.toml", MAX_RECIPE_BYTES)
    if problem:
        return {}, problem
    try:
        data = tomllib.loads(raw.decode("utf-8"))
        return plain(data), ""
    except UnicodeDecodeError as exc:
        return {}, f"recipe.toml: not UTF-8 (bad byte at offset {exc.start})"
    except RecursionError:
        return {}, "recipe.toml: nested too deeply"
    except (tomllib.TOMLDecodeError, RecordError) as exc:
        return {}, f"recipe.toml: {printable(str(exc).splitlines()[0] if str(exc) else 'not valid TOML')}"


class Events(list):
    """Checked events (a list), with the count of lines skipped as bad and the first one's reason; `problem`
    says why the file could not be read at all ("" when it could, or does not exist)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.bad_lines = 0
        self.first_bad = ""
        self.problem = ""

    def _feed(self, raw: bytes, kind: str | None, torn_ok: bool = False) -> None:
        if not raw.strip():
            return
        try:
            event = parse_event(raw)
        except RecordError as exc:
            if not torn_ok:  # a last line without its newline is still being written: not a bad line
                self.bad_lines += 1
                self.first_bad = self.first_bad or str(exc)
            return
        if kind is None or event["kind"] == kind:
            self.append(event)

    def _skipped_long(self) -> None:
        self.bad_lines += 1
        self.first_bad = self.first_bad or f"a line longer than {MAX_LINE_BYTES} bytes"

    @property
    def note(self) -> str:
        """One line about what was not read ("" when everything was)."""
        if self.problem:
            return self.problem
        if self.bad_lines:
            return f"{self.bad_lines} bad line{'s' if self.bad_lines > 1 else ''} skipped ({self.first_bad})"
        return ""


def read_events(path: Path, kind: str | None = None) -> Events:
    """All checked events of a run (of one kind if given). A bad line is skipped and counted; a torn last line
    is skipped; a line longer than MAX_LINE_BYTES is skipped without being held in memory."""
    out = Events()
    file = Path(path) / "metrics.jsonl"
    try:
        f = os.fdopen(open_regular(file), "rb")
    except FileNotFoundError:
        return out
    except OSError as exc:
        out.problem = f"metrics.jsonl: {os_reason(exc, with_path=False)}"
        return out
    except RecordError as exc:
        out.problem = f"metrics.jsonl {exc}"
        return out
    with f:
        try:
            while raw := f.readline(CHUNK_BYTES):
                if len(raw) == CHUNK_BYTES and not raw.endswith(b"\n"):
                    out._skipped_long()
                    while (rest := f.readline(CHUNK_BYTES)) and not rest.endswith(b"\n"):
                        pass
                    continue
                out._feed(raw, kind, torn_ok=not raw.endswith(b"\n"))
        except OSError as exc:
            out.problem = f"metrics.jsonl: {os_reason(exc, with_path=False)}"
    return out


def read_complete_lines(path: Path, offset: int, limit: int = 8 << 20) -> tuple[str, int]:
    """The text of the complete lines of `path` from byte `offset` on (at most `limit` bytes), and the offset
    just past them.

    A last line without its newline is still being written: it is left for the next read rather than torn
    (unless it alone fills `limit`: then it is cut there, so that a reader never stalls). An unreadable (e.g.
    not yet created) file reads as no text, with the offset unchanged. Invalid UTF-8 and NUL read as U+FFFD.
    Shared by the incremental readers here and in bcdtui.tailer, so that they agree on what a line is."""
    try:
        data = read_file_bytes(path, limit, offset)
    except (OSError, RecordError):
        return "", offset
    end = data.rfind(b"\n") + 1
    if end == 0 and len(data) >= limit:
        end = len(data)
    return data[:end].decode("utf-8", errors="replace").replace("\x00", "\ufffd"), offset + end


class EventTail:
    """Incremental reader: each `poll()` returns only the checked events appended since the last call, and
    never consumes a line that is not yet complete. Bad lines are skipped and counted (`bad_lines`). When the
    file is replaced or shrinks (a resume that dropped superseded events), it starts again from the top and
    counts `restarts`: the caller then drops what it folded so far."""

    def __init__(self, path: Path) -> None:
        self.file = Path(path) / "metrics.jsonl"
        self.offset = 0
        self.restarts = 0
        self._ino: int | None = None
        self._skipping = False  # inside a line longer than MAX_LINE_BYTES
        self._events = Events()

    @property
    def bad_lines(self) -> int:
        return self._events.bad_lines

    @property
    def note(self) -> str:
        return self._events.note

    def poll(self) -> list[dict]:
        found = self._events
        found.clear()
        found.problem = ""
        while True:
            try:
                fd = open_regular(self.file)
            except FileNotFoundError:
                return []
            except OSError as exc:
                found.problem = f"metrics.jsonl: {os_reason(exc, with_path=False)}"
                return []
            except RecordError as exc:
                found.problem = f"metrics.jsonl {exc}"
                return []
            try:
                st = os.fstat(fd)
                if self._ino is not None and (st.st_ino != self._ino or st.st_size < self.offset):
                    self.offset, self._skipping, self.restarts = 0, False, self.restarts + 1
                    found.clear()
                    found.bad_lines, found.first_bad = 0, ""  # the new stream's bad lines are counted anew
                self._ino = st.st_ino
                data = os.pread(fd, min(CHUNK_BYTES, max(0, st.st_size - self.offset) + 4096), self.offset)
            except OSError as exc:
                found.problem = f"metrics.jsonl: {os_reason(exc, with_path=False)}"
                return list(found)
            finally:
                os.close(fd)
            end = data.rfind(b"\n") + 1
            if end == 0:
                if len(data) == CHUNK_BYTES:  # one line fills the chunk: skip it to its end
                    if not self._skipping:
                        found._skipped_long()
                    self._skipping = True
                    self.offset += len(data)
                    continue
                return list(found)
            lines = data[:end].split(b"\n")
            if self._skipping:
                lines, self._skipping = lines[1:], False  # the rest of the long line
            for raw in lines:
                found._feed(raw, None)
            self.offset += end
            if len(data) < CHUNK_BYTES:
                return list(found)
