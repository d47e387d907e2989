"""What the screens show, as plain functions of the workstation's data (rich Text, no Textual): the tests call
them without a terminal, and the screens only place their output."""
from __future__ import annotations

import json
import math
from typing import Any

from rich.markup import escape
from rich.text import Text

from bcdcore.rundir import printable
from bcdtui.recipes import LaunchPlan
from bcdtui.runs import COLUMN_TITLES, RunRow, fmt_duration, fmt_number, progress_bar
from bcdtui.tailer import RunFollower, number

STATE_STYLES = {"running": "bold #4fc3f7", "queued": "#b0bec5", "starting": "#b0bec5", "finished": "#81c784",
                "failed": "bold #e57373", "error": "bold #e57373", "killed": "#ffb74d", "lost": "bold #ba68c8",
                "unreadable": "bold #e57373"}
MET = "#81c784"  # a block whose inexactness rule held


def styled_state(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state.split(":", 1)[0], ""))  # "unreadable: <reason>" too


def short(value: Any, limit: int = 200) -> str:
    """A measurement's value or extra field on one line of at most `limit` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def block_cells(event: dict) -> tuple:
    """One row of the run screen's blocks table, from a `block` event."""
    res, thr = number(event.get("residual")), number(event.get("threshold"))
    met = math.isfinite(thr) and res <= thr
    steps = str(event.get("inner_steps", ""))  # "↓": its inexactness rule stopped it early (one column, not two)
    return (str(event.get("block", "")), Text(f"{steps}↓", style=MET) if event.get("stopped_early") else steps,
            Text(fmt_number(res, 3), style=MET if met else ""),
            fmt_number(thr, 3) if math.isfinite(thr) else "off", fmt_number(number(event.get("lambda")), 3),
            fmt_number(number(event.get("gamma")), 2), fmt_number(number(event.get("dist")), 3))


def runs_info(model, shown: int, marked: int) -> str:
    """The line under the runs table: how many shown, the sort, the filters, the marks, the backfill."""
    column = model.sort_column
    title = COLUMN_TITLES.get(column, column.removeprefix("cfg:"))
    parts = [f"{shown} of {len(model.rows)} runs", f"sort {title} {'↓' if model.sort_reverse else '↑'}",
             f"states: {model.state_filter}"]
    if model.filter_text:
        parts.append(f"filter: {model.filter_text!r}")
    if marked:
        parts.append(f"{marked} marked")
    if model.pending:
        parts.append(f"reading {model.pending} more runs")
    return " · ".join(parts)


def empty_state(runs_dir, recipes_dir, width: int = 80) -> Text:
    """The first start (no runs yet): what to press."""
    text = Text()
    text.append("No runs yet", style="bold")
    text.append(f" in {printable(str(runs_dir))}.\n\n")
    for key, what in (("l", f"launch a recipe from {printable(str(recipes_dir))} (overrides, GPUs, sweep preview)"),
                      ("F3 or e", "edit recipes (ctrl+n makes a new one from a template)"),
                      ("F1", "every key; ctrl+p finds an action by name"),
                      ("ctrl+q", "quit (runs keep running; the next start finds them)")):
        text.append(f"  {key:<8}", style="bold #4fc3f7")
        text.append(f" {what}\n")
    return text


def launch_preview(plan: LaunchPlan, usage: dict[str, int], slots: list[str], per_slot: int,
                   limit: int = 5) -> list[Text]:
    """The launch dialog's plan: the validation, how many runs start now and how many wait, the first `limit`
    points; the count line says how many are not listed, so it shows even when the dialog is short."""
    free = sum(max(0, per_slot - usage.get(s, 0)) for s in slots)
    n = len(plan.runs)
    starts = min(n, free)
    more = len(plan.points) - limit if len(plan.points) > limit else 0
    listed = f" ({limit} listed below, and {more} more)" if more else ""
    lines = [Text(f"✓ {plan.summary}", style="green"),
             Text(f"{n} run{'s' if n > 1 else ''}{listed}: {starts} start{'s' if starts == 1 else ''} now, "
                  f"{n - starts} wait{'s' if n - starts == 1 else ''} in the queue "
                  f"(slots {', '.join(slots)}, {per_slot} per slot)")]
    # escape(): as the dialog has always shown them (a Text takes no markup, so this only matters for lines
    # that look like a tag)
    return lines + [Text("  " + escape(line), style="dim") for line in plan.describe(limit=limit)]


def run_summary(row: RunRow | None, f: RunFollower) -> list[Text]:
    """The run screen's status lines: state, progress, ETA, where it runs; the latest metrics; then its error,
    its end, and any skipped event lines. `row` is the runs table's row (None when the run left the table)."""
    status = f.status
    state = row.state if row else status.get("state", "unknown")
    progress = status.get("progress") or {}
    rounds = progress.get("rounds", 0)  # checked ints (bcdcore.records)
    # the later of status.json's progress (rewritten at most 4 times a second) and the last metric event read
    rnd = max(progress.get("round", 0), max(f.rows, default=0))
    line1 = styled_state(state)
    line1.append("  ")
    if rounds:
        line1.append(f"round {rnd}/{rounds} {progress_bar(rnd / rounds)}  ")
    if row is not None and state == "running" and math.isfinite(row.eta_s):
        line1.append(f"ETA {fmt_duration(row.eta_s)}  ")
    start = f.start
    bits = []
    if start:
        bits.append(f"{start.get('device', '?')} · ops {start.get('backend', '?')} · "
                    f"{start.get('n_blocks', '?')} blocks {start.get('block_sizes', '')}")
    if status.get("gpu"):
        bits.append(f"GPU {status['gpu']}")
    if row is not None and row.holder:
        bits.append(f"writer {row.holder} (holds the lock)")
    elif status.get("host"):
        bits.append(f"{status['host']}:{status.get('pid', '?')}")
    line1.append(" · ".join(bits), style="dim")
    last = f.last_metrics()
    line2 = Text()
    for name in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc"):
        if name in last:
            line2.append(f"{name} ", style="dim")
            line2.append(f"{fmt_number(last[name])}  ")
    for name, label in (("grad_evals", "grad evals"), ("wall_s", "wall")):
        if name in last:
            line2.append(f"{label} ", style="dim")
            line2.append(fmt_duration(last[name]) if name == "wall_s" else f"{last[name]:.0f}")
            line2.append("  ")
    lines = [line1, line2]
    error = status.get("error") or (row.error if row is not None else "")
    if state == "unreadable":
        lines.append(Text(f"unreadable: {error}", style="bold #e57373"))
    elif error and state in ("failed", "lost", "killed", "error"):
        lines.append(Text(f"error: {error}", style="bold #e57373"))
    elif f.end:
        lines.append(Text(f"ended {f.end.get('state', '')}: {f.end.get('reason') or ''}",
                          style=STATE_STYLES.get(str(f.end.get("state")), "")))
    if f.note:  # bad event lines skipped: said on the third line, after what it already says
        note = Text(f"skipped: {f.note}", style="#ffb74d")
        if len(lines) > 2:
            lines[2].append("  ")
            lines[2].append_text(note)
        else:
            lines.append(note)
    return lines



def launch_summary(row: RunRow) -> list[Text]:
    """The run screen of a launch that has no run directory (queued, starting, or refused by the engine)."""
    lines = [styled_state(row.state), Text(f"{row.recipe}", style="bold")]
    lines[0].append(f"  {printable(row.recipe)}  (no run directory yet)", style="dim")
    if row.error:
        lines.append(Text(f"error: {printable(row.error)}", style="bold #e57373"))
    lines[1] = Text("the launch's output is below; d removes this row, l launches again", style="dim")
    return lines
