"""What a run says: the progress bar on the console, the final one-line summary, the one-line error of a
failure, and log.txt's handler (quiet when the disk refuses a line)."""
from __future__ import annotations

import logging
import math

from bcdcore.recipe import os_reason
from bcdcore.resources import is_out_of_memory


class RoundProgress:
    """Rich progress bar on the console: round, loss, val metric, ETA."""

    def __init__(self, console, rounds: int, done: int) -> None:
        self.bar = None
        if console is None:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("round {task.completed}/{task.total}"), BarColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                            transient=False)
        self.task = self.bar.add_task("train", total=rounds, completed=done, info="")
        self.bar.start()

    def update(self, t: int, metrics: dict, event: dict | None = None) -> None:
        if self.bar is None:
            return
        info = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith("test_"))
        self.bar.update(self.task, completed=t, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class PlainConsole:
    """Where `bcdcore run` reports when its stdout is not a terminal (a pipe, a file, a CI log): one plain line
    per evaluation, no live display and no terminal escapes. Passed where a rich Console would be."""

    def __init__(self, stream) -> None:
        self.stream = stream


class LineProgress:
    """`round 12/300  train_loss 0.4123  val_acc 0.9120  grad_evals 361.2  3.4s`, once per evaluation (a round
    whose metrics include validation) and at the last round."""

    def __init__(self, stream, rounds: int) -> None:
        self.stream, self.rounds = stream, rounds

    def update(self, t: int, metrics: dict, event: dict | None = None) -> None:
        if not any(k.startswith("val_") for k in metrics) and t < self.rounds:
            return
        event = event or {}
        parts = [f"round {t}/{self.rounds}"]
        parts += [f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith("test_") and _number(v)]
        if _number(event.get("grad_evals")):
            parts.append(f"grad_evals {event['grad_evals']:.1f}")
        if _number(event.get("wall_s")):
            parts.append(f"{event['wall_s']:.1f}s")
        try:
            print("  ".join(parts), file=self.stream, flush=True)
        except (OSError, ValueError):  # the reader went away (`| head`): the run goes on, its files say it all
            pass

    def close(self) -> None:
        pass


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def progress_for(console, rounds: int, done: int):
    """The run's console report: plain lines for a PlainConsole, a rich bar for a rich Console, none for None."""
    if isinstance(console, PlainConsole):
        return LineProgress(console.stream, rounds)
    return RoundProgress(console, rounds, done)


class QuietFileHandler(logging.FileHandler):
    """log.txt: a line that cannot be written (a full disk) is lost quietly; logging's default prints a
    traceback to stderr, and the run's status says what happened."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def final_summary(state: str, reason: str, final_metrics: dict | None) -> str:
    """The run's last console line: `finished: rounds done  |  test_acc 0.9889 ...`."""
    m = final_metrics or {}
    parts = [f"{k} {m[k]:.4f}" for k in ("test_acc", "test_loss", "val_acc", "val_loss") if
             isinstance(m.get(k), (int, float)) and math.isfinite(m[k])]
    return f"{state}: {reason}" + (f"  |  {'  '.join(parts)}" if parts else "")


def error_line(exc: BaseException) -> str:
    """One line for status.json and the end event: the exception's type and the first line of its message
    (the whole traceback goes to the log)."""
    if isinstance(exc, OSError) and exc.strerror:
        return os_reason(exc)  # e.g. "no space left on device: runs/x/metrics.jsonl"
    if is_out_of_memory(exc):
        return f"out of memory ({type(exc).__name__}); use a smaller model, batch_size or dataset"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"error: {type(exc).__name__}: {lines[0]}" if lines else f"error: {type(exc).__name__}"
