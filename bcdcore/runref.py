"""Which run a user means: the one lookup every command that takes a run uses (`plot`, `tag`, `run --resume`,
`export`).

A reference is a path to a run directory, or a run's full id, or its short display id (name + 6 hex, or the
display name the user gave it), or an unambiguous prefix of either, looked up in the runs directory
(`--runs-dir`, else $BCD_RUNS, else ./runs) and in the sweep directories inside it. An existing path always
wins, so `bcdcore plot runs/x` means what it did before. No torch here.
"""
from __future__ import annotations

import os
from pathlib import Path

from bcdcore.annotations import read_annotations
from bcdcore.recipe import RecipeError
from bcdcore.rundir import display_id, list_runs, printable

MAX_CANDIDATES = 5  # named in an "ambiguous" error; the rest are counted


class RunRefError(RecipeError):
    """A reference that names no run, or more than one; one line (exit 2) naming what to type instead."""


def resolve_run(ref: str | Path, runs_dir: Path) -> Path:
    """The run directory `ref` names (see the module's docstring); RunRefError when it names none or several.

    The order: an existing path; then a run whose full id equals `ref`; then runs whose display id equals it;
    then runs whose full or display id starts with it. The first step that finds anything decides, so a full
    id that is also the prefix of a second copy's id (`x` and `x-2`) still means the first."""
    text = str(ref)
    if not text.strip():
        raise RunRefError("an empty run reference; give a run directory or a run id (see `bcdcore ls`)")
    if os.path.lexists(text):
        return Path(text)
    where = printable(str(runs_dir))
    if os.sep in text or (os.altsep and os.altsep in text):  # a path that does not exist: no lookup by id
        raise RunRefError(f"{printable(text)}: not a run directory (no such path); "
                          "give a run directory or a run id (see `bcdcore ls`)")
    runs = list_runs(Path(runs_dir))
    shown = {path: display_id(path.name, read_annotations(path)[0].name) for path in runs}
    for matches in ([p for p in runs if p.name == text],
                    [p for p in runs if shown[p] == text],
                    [p for p in runs if p.name.startswith(text) or shown[p].startswith(text)]):
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise RunRefError(_ambiguous(text, matches, shown))
    raise RunRefError(f"{printable(text)}: not a run directory, nor the id of a run in {where} "
                      "(see `bcdcore ls`, or pass --runs-dir)")


def _ambiguous(text: str, matches: list[Path], shown: dict[Path, str]) -> str:
    names = [f"{printable(p.name)}" + (f" ({printable(shown[p])})" if shown[p] != p.name else "")
             for p in matches[:MAX_CANDIDATES]]
    more = len(matches) - MAX_CANDIDATES
    return (f"{printable(text)}: {len(matches)} runs match: {', '.join(names)}" + (f" and {more} more" if more > 0
            else "") + "; give more of the id")
