"""A run's tags, notes and display name, as W&B and MLflow users keep them: `RUN_DIR/annotations.json`.

The run's own writer never touches this file; the user edits it while the run trains or long after (from the
TUI or `bcdcore tag`), so it is separate from status.json and written through a rename. Two editors at once are
serialised by an flock on the run directory itself (not on RUN_DIR/lock, which the trainer holds for hours).
Reading is total: a missing, broken or hostile file reads as no annotations plus the reason. No torch here.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from bcdcore.recipe import RecipeError
from bcdcore.records import RecordError, decode_object, printable
from bcdcore.rundir import write_bytes_atomic
from bcdcore.runfiles import read_file_bytes

ANNOTATIONS_FILE = "annotations.json"
ANNOTATIONS_VERSION = 1
TAG_PATTERN = r"[A-Za-z0-9_.:+=-]{1,40}"
MAX_TAGS = 32
MAX_NAME = 200
MAX_NOTES = 64 << 10  # characters: a paragraph or a page, not a log
MAX_FILE_BYTES = 1 << 20


class AnnotationError(RecipeError):
    """A tag, name or note the user typed that cannot be stored; one line naming it and the rule (exit 2)."""


@dataclass(frozen=True)
class Annotations:
    """What the user wrote about a run. `name` is shown in place of the run id's name part when set."""

    name: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    notes: str = ""

    def to_json(self) -> dict:
        return {"version": ANNOTATIONS_VERSION, "name": self.name, "tags": list(self.tags), "notes": self.notes}


# ----------------------------------------------------------------------------------------------------------
# checks on what the user types

def check_tag(tag: str) -> str:
    tag = tag.strip()
    if not re.fullmatch(TAG_PATTERN, tag):
        raise AnnotationError(f"tag {printable(tag)[:60]!r}: use 1-40 letters, digits or _ . : + = - "
                              "(no spaces or commas)")
    return tag


def check_name(name: str) -> str:
    name = name.strip()
    if len(name) > MAX_NAME:
        raise AnnotationError(f"display name is {len(name)} characters long; the most is {MAX_NAME}")
    if not name.isprintable():
        raise AnnotationError("display name: control characters are not allowed (type plain text)")
    return name


def check_notes(notes: str) -> str:
    if len(notes) > MAX_NOTES:
        raise AnnotationError(f"notes are {len(notes)} characters long; the most is {MAX_NOTES}")
    if "\x00" in notes:
        raise AnnotationError("notes: NUL characters are not allowed")
    return notes


def _tags(values: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for tag in values:
        tag = check_tag(tag)
        if tag not in out:
            out.append(tag)
    if len(out) > MAX_TAGS:
        raise AnnotationError(f"a run holds at most {MAX_TAGS} tags; remove some first")
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# reading (total) and writing (serialised, atomic)

def parse_annotations(raw: bytes) -> Annotations:
    """The annotations of a file's bytes; RecordError (one line) for anything that is not what we write."""
    data = decode_object(raw, ANNOTATIONS_FILE)
    try:
        name = data.get("name", "")
        tags = data.get("tags", [])
        notes = data.get("notes", "")
        if not isinstance(name, str) or not isinstance(notes, str):
            raise AnnotationError("name and notes must be strings")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise AnnotationError("tags must be a list of strings")
        return Annotations(check_name(name), _tags(tags), check_notes(notes))
    except AnnotationError as exc:
        raise RecordError(f"{ANNOTATIONS_FILE}: {exc}") from None


def read_annotations(run_dir: Path) -> tuple[Annotations, str]:
    """(annotations, "") or (empty annotations, why the file cannot be read). No file is no annotations."""
    path = Path(run_dir) / ANNOTATIONS_FILE
    try:
        raw = read_file_bytes(path, MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return Annotations(), ""
    except (OSError, RecordError) as exc:
        return Annotations(), f"{ANNOTATIONS_FILE}: {printable(str(exc))[:200]}"
    if len(raw) > MAX_FILE_BYTES:
        return Annotations(), f"{ANNOTATIONS_FILE}: larger than {MAX_FILE_BYTES} bytes"
    try:
        return parse_annotations(raw), ""
    except RecordError as exc:
        return Annotations(), str(exc)


def update_annotations(run_dir: Path, *, name: str | None = None, add_tags: Iterable[str] = (),
                       remove_tags: Iterable[str] = (), notes: str | None = None) -> Annotations:
    """Change what is given, keep the rest, and return the stored result. A file that cannot be read is not
    silently replaced (the user's notes may be in it): AnnotationError says so and how to fix it."""
    run_dir = Path(run_dir)
    if not (run_dir / "status.json").exists():
        raise AnnotationError(f"{run_dir}: not a run directory (no status.json)")
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the directory itself: RUN_DIR/lock belongs to the trainer
        current, problem = read_annotations(run_dir)
        if problem:
            raise AnnotationError(f"{run_dir}: {problem}; fix or remove the file first")
        removed = {check_tag(t) for t in remove_tags}
        tags = _tags([t for t in current.tags if t not in removed] + list(add_tags))
        new = Annotations(current.name if name is None else check_name(name), tags,
                          current.notes if notes is None else check_notes(notes))
        write_bytes_atomic(run_dir / ANNOTATIONS_FILE, json.dumps(new.to_json(), indent=1).encode())
        return new
    finally:
        os.close(fd)  # closing drops the flock
