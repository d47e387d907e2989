"""`bcdcore ls` and `bcdcore tag`: the commands that read and annotate run directories (no torch).

`ls` prints one row per run in plain aligned columns that fit their content (nothing is ever cut; a terminal
narrower than a row wraps it), the same on a terminal and in a pipe; `--json` is the form for scripts. Nothing
in a run directory can make either command raise: the readers are total (bcdcore.records, bcdcore.annotations).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from bcdcore.annotations import AnnotationError, check_tag, read_annotations, update_annotations
from bcdcore.recipe import RecipeError, did_you_mean, os_reason
from bcdcore.records import STATES
from bcdcore.rundir import (
    default_runs_dir,
    display_id,
    json_safe,
    list_runs,
    lost_reason,
    printable,
    read_events,
    read_status_checked,
    run_state,
)
from bcdcore.runref import resolve_run

SHOWN_STATES = (*STATES, "lost", "unreadable", "unknown")  # what bcdcore.rundir.run_state can answer
PRIMARY_METRICS = ("val_acc", "val_loss")  # the validation metric a row shows: accuracy where the task has one
NOT_METRICS = ("v", "kind", "t", "round")
MAX_NOTES_FILE = 1 << 20
HEADER = ("run", "state", "val", "round", "started", "tags", "note")


# ----------------------------------------------------------------------------------------------------------
# bcdcore ls

def cmd_ls(args) -> int:
    """One row per run (see the module docstring); `--state` and `--tag` filter, `--json` prints a list."""
    runs_dir = Path(getattr(args, "runs_dir", None) or default_runs_dir())
    states = parse_states(getattr(args, "state", None) or [])
    tags = [check_tag(t) for t in getattr(args, "tag", None) or []]
    problem = runs_dir_problem(runs_dir)
    if problem:
        print(f"error: {printable(str(runs_dir))}: {problem}", file=sys.stderr)
        return 2
    runs = list_runs(runs_dir)
    records = [r for r in map(ls_record, runs)
               if (not states or r["state"] in states) and all(t in r["tags"] for t in tags)]
    if getattr(args, "json", False):
        print(json.dumps(json_safe(records), indent=1))
        return 0
    if not records:
        wanted = " and ".join(filter(None, (states and f"--state {','.join(states)}",
                                            tags and " ".join(f"--tag {t}" for t in tags))))
        print(f"no runs in {printable(str(runs_dir))}" + (f" match {wanted} (of {len(runs)})" if runs else ""))
        return 0
    print(format_table(HEADER, [ls_row(r) for r in records]))
    return 0


def parse_states(values: list[str]) -> list[str]:
    """`--state running,lost --state failed` as a list; an unknown state is a one-line error (exit 2)."""
    states = [s.strip() for value in values for s in value.split(",") if s.strip()]
    for s in states:
        if s not in SHOWN_STATES:
            raise RecipeError(f"--state {s!r}: unknown state{did_you_mean(s, SHOWN_STATES)}; "
                              f"choose from {', '.join(SHOWN_STATES)}")
    return states


def runs_dir_problem(runs_dir: Path) -> str:
    """Why `runs_dir` cannot be listed ("" when it can, or does not exist: then it has no runs)."""
    try:
        with os.scandir(runs_dir):
            return ""
    except FileNotFoundError:
        return ""
    except NotADirectoryError:
        return "not a directory"
    except OSError as exc:
        return f"cannot list it ({os_reason(exc, with_path=False)})"


def final_metrics(events) -> dict:
    """The last value of every metric the run's metric events carry (a metric measured every few rounds keeps
    its last measurement, not the None of the rounds in between)."""
    out: dict = {}
    for e in events:
        if e["kind"] == "metric":
            out.update((k, v) for k, v in e.items() if k not in NOT_METRICS and v is not None)
    return out


def ls_record(path: Path) -> dict:
    """What `ls` knows of one run: its displayed state (bcdcore.rundir.run_state), final metrics and
    annotations. The keys of earlier versions stay (scripts read them); new ones are added."""
    status, problem = read_status_checked(path)
    state = run_state(status, path, problem)
    events = read_events(path)
    metrics = final_metrics(events)
    starts = [i for i, e in enumerate(events) if e["kind"] == "start"]
    ends = [e for e in events[starts[-1] if starts else 0:] if e["kind"] == "end"]  # of the last segment only
    last = next((e for e in reversed(events) if e["kind"] == "metric"), {})
    progress = status.get("progress") or {}
    val = next((k for k in PRIMARY_METRICS if k in metrics), None)
    test = next((k for k in ("test_acc", "test_loss") if k in metrics), None)
    notes, note_problem = read_annotations(path)
    return {"run": printable(path.name), "id": printable(path.name),
            "display_id": printable(display_id(path.name, notes.name)), "path": printable(str(path)),
            "state": state.state, "reason": lost_reason(state, ends[-1] if ends else None), "holder": state.holder,
            # the later of status.json's progress (rewritten at most 4 times a second) and the last metric event
            "round": max((v for v in (progress.get("round"), last.get("round"))
                          if isinstance(v, int) and not isinstance(v, bool)), default=0),
            "rounds": progress.get("rounds"), "started": status.get("started"),
            "train_loss": last.get("train_loss"),
            "val": {"name": val, "value": metrics[val]} if val else None,
            "test": {"name": test, "value": metrics[test]} if test else None,
            "metrics": metrics, "name": notes.name, "tags": list(notes.tags), "notes": notes.notes,
            "annotations_problem": note_problem, "bad_lines": events.bad_lines, "note": events.note}


def ls_row(record: dict) -> tuple[str, ...]:
    val = record["val"]
    rounds = record["rounds"] if record["rounds"] is not None else "?"
    return (record["display_id"], record["state"], f"{val['name']} {fmt(val['value'])}" if val else "",
            f"{record['round']}/{rounds}", started_cell(record["started"]), ",".join(record["tags"]),
            note_cell(record))


def note_cell(record: dict) -> str:
    """Why a run is unreadable or lost, the bad event lines skipped, an annotations file that cannot be read."""
    parts = [record["reason"]] if record["state"] in ("unreadable", "lost") and record["reason"] else []
    n = record["bad_lines"]
    if n:
        parts.append(f"{n} bad line{'s' if n > 1 else ''}")
    elif record["note"]:
        parts.append(record["note"])
    if record["annotations_problem"]:
        parts.append(record["annotations_problem"])
    return "; ".join(parts)


def started_cell(when) -> str:
    if not isinstance(when, (int, float)) or isinstance(when, bool):
        return ""
    return time.strftime("%m-%d %H:%M", time.localtime(when))


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, (int, float)) else printable(str(value))


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns as wide as their widest cell, two spaces apart; a column empty in every row is left out."""
    rows = [tuple(printable(c) for c in row) for row in rows]
    keep = [i for i in range(len(header)) if any(row[i] for row in rows) or i < 2]
    widths = {i: max(len(header[i]), *(len(row[i]) for row in rows)) for i in keep}
    lines = ["  ".join(cells[i].ljust(widths[i]) for i in keep).rstrip() for cells in (header, *rows)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# bcdcore tag

def cmd_tag(args) -> int:
    """Change a run's tags, display name or notes (what is given; the rest stays) and print what is stored."""
    runs_dir = Path(args.runs_dir or default_runs_dir())
    path = resolve_run(args.run, runs_dir)
    if not (path / "status.json").exists():
        raise AnnotationError(f"{printable(str(path))}: not a run directory (no status.json)")
    notes = args.notes
    if args.notes_file is not None:
        if notes is not None:
            raise AnnotationError("give --notes or --notes-file, not both")
        notes = read_notes_file(args.notes_file)
    if args.add or args.remove or args.name is not None or notes is not None:
        stored = update_annotations(path, name=args.name, add_tags=args.add or (), remove_tags=args.remove or (),
                                    notes=notes)
    else:
        stored, problem = read_annotations(path)
        if problem:
            raise AnnotationError(f"{printable(str(path))}: {problem}; fix or remove the file")
    print(f"run:   {printable(display_id(path.name, stored.name))}  ({printable(str(path))})")
    print(f"name:  {printable(stored.name)}")
    print(f"tags:  {', '.join(stored.tags)}")
    lines = stored.notes.splitlines() or [""]
    print("notes: " + "\n       ".join(printable(line) for line in lines))
    return 0


def read_notes_file(name: str) -> str:
    """The text of `--notes-file` (`-` reads stdin); a file that is missing, not text or too large is one line."""
    path = Path(name)
    try:
        if name == "-":
            return sys.stdin.buffer.read(MAX_NOTES_FILE + 1).decode("utf-8")  # too long: check_notes says so
        if not path.is_file():
            raise AnnotationError(f"--notes-file {printable(name)}: no such file (or not a regular file)")
        if path.stat().st_size > MAX_NOTES_FILE:
            raise AnnotationError(f"--notes-file {printable(name)}: larger than {MAX_NOTES_FILE} bytes")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"--notes-file {printable(name)}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise AnnotationError(f"--notes-file {printable(name)}: {os_reason(exc, with_path=False)}") from None
