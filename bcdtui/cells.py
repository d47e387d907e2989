"""The runs table's columns and the text of each cell: plain functions of a row (the table, the headless twin
and the tests share them).

The order is built around the numbers at 80 columns: the short display id (name + 6 hex: the start time is in
`started`), the state, the primary validation metric with its value, then round, ETA and train loss; the rest
(tags, progress bar, GPU, start time, recipe, and the recipe keys the user picked) follows to the right, reached
by scrolling column by column.
"""
from __future__ import annotations

import math
import re
import tomllib
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from bcdcore.rundir import display_id, printable

if TYPE_CHECKING:
    from bcdtui.rows import RunRow

COLUMNS = ("run", "state", "val", "round", "eta", "train_loss", "tags", "progress", "gpu", "started", "recipe")
COLUMN_TITLES = {"run": "run", "state": "state", "val": "val", "round": "round", "eta": "ETA",
                 "train_loss": "train loss", "tags": "tags", "progress": "progress", "gpu": "GPU",
                 "started": "started (UTC)", "recipe": "recipe"}
CONFIG_PREFIX = "cfg:"  # a config column's key: cfg:algorithm.K
_PATH_PREFIX = re.compile(r"^[^:]*/([^/:]+:\d+: )")  # "/abs/recipes/x.toml:3: " -> "x.toml:3: "
REASON_CHARS = 40  # an error or unreadable reason in the state cell (in full on the run screen)


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


def clip(text: str, limit: int = REASON_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def state_text(row: "RunRow") -> str:
    """The state, with the reason for the states that have one (a launch the engine refused, an unreadable
    status): the row says why, not only a toast."""
    if row.state in ("unreadable", "error") and row.error:
        # an engine error names the recipe by its path: the file's name is enough in a cell
        reason = _PATH_PREFIX.sub(r"\1", row.error)
        return f"{row.state}: {clip(reason)}"
    return row.state


def run_label(row: "RunRow") -> str:
    if row.job_id:
        return f"⧗ {row.recipe}"
    return display_id(row.id, row.name)


def row_cells(row: "RunRow", config_keys: tuple[str, ...] = ()) -> dict[str, str]:
    """The text of each column for one row (and of each config column `cfg:KEY` asked for)."""
    val = ""
    if row.val_name:
        val = f"{row.val_name.removeprefix('val_')} {fmt_number(row.val_value)}"
    cells = {
        "run": printable(run_label(row)),
        "state": printable(state_text(row)),
        "val": val,
        "round": f"{row.round}/{row.rounds}" if row.rounds else "",
        "eta": fmt_duration(row.eta_s) if row.state == "running" else "",
        "train_loss": fmt_number(row.train_loss),
        "tags": " ".join(row.tags),
        "progress": progress_bar(row.progress) if row.rounds else "",
        "gpu": printable(row.gpu) or ("cpu" if row.path is not None and row.state != "unknown" else ""),
        "started": fmt_time(row.started),
        "recipe": printable(row.recipe),  # from status.json, or a saved launch's label: shown, never obeyed
    }
    for key in config_keys:
        cells[CONFIG_PREFIX + key] = printable(row.config.get(key, ""))
    return cells


# ----------------------------------------------------------------------------------------------------------
# config columns: values from each run's resolved recipe.toml

def recipe_values(path: Path | None) -> dict:
    """A run's resolved recipe as {dotted.key: value text}; {} when it cannot be read (any bytes may be there)."""
    if path is None:
        return {}
    try:
        with open(path / "recipe.toml", "rb") as f:
            raw = f.read(1 << 20)
        data = tomllib.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    out: dict[str, str] = {}
    for section, table in data.items():
        if isinstance(table, dict):
            for key, value in table.items():
                if not isinstance(value, (dict, list)) or (isinstance(value, list) and len(value) <= 8):
                    out[f"{section}.{key}"] = str(value)
    return out


def pick_values(config: dict, keys: tuple[str, ...]) -> dict:
    return {k: config[k] for k in keys if k in config}


def with_config(row: "RunRow", config: dict, keys: tuple[str, ...]) -> "RunRow":
    picked = pick_values(config, keys)
    if picked == row.config:
        return row
    return replace(row, config=picked)
