"""Starting and resuming a single-process run: the run directory is made only after validation, the writer
lock is taken before a resume looks at the run, and a run that cannot continue says why in one line.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

from bcdcore.recipe import Recipe, RecipeError, load_recipe, os_reason, to_toml
from bcdcore.run.console import error_line
from bcdcore.run.loop import Run
from bcdcore.run.prepare import prepare
from bcdcore.rundir import RunDir
from bcdcore.runfiles import read_status_checked


def start_run(recipe: Recipe, runs_dir: Path) -> Run:
    """Validate and build everything first (nothing is written before that passes), then create the run
    directory, which holds the writer lock until the run ends."""
    prepared = prepare(recipe)
    rundir = create_rundir(runs_dir, recipe)
    try:
        return Run(prepared, rundir)
    except BaseException as exc:  # Ctrl-C or a fault before the loop: the run must not stay "queued"
        abandon_rundir(rundir, exc)
        raise


def create_rundir(runs_dir: Path, recipe: Recipe) -> RunDir:
    """The new run's directory; a runs directory that cannot take it is a RecipeError naming why."""
    try:
        return RunDir.create(runs_dir, recipe.run.name, recipe.digest(), to_toml(recipe.to_dict()))
    except OSError as exc:
        raise RecipeError(f"cannot create a run directory under {runs_dir}: {os_reason(exc)}; "
                          "pass --runs-dir DIR or set $BCD_RUNS to a writable folder") from None


def abandon_rundir(rundir: RunDir, exc: BaseException) -> None:
    state = "killed" if isinstance(exc, KeyboardInterrupt) else "failed"
    try:
        rundir.write_status(state=state, ended=time.time(), exit_code=130 if state == "killed" else 1,
                            error=None if state == "killed" else error_line(exc))
    except OSError:
        pass
    rundir.close()


def resume_run(run_path: Path) -> Run:
    """Take the run's writer lock first (a second `--resume` is refused naming the holder), then check it can
    continue and load its checkpoint; on any refusal the lock is released and nothing has changed."""
    run_path = Path(run_path)
    if not run_path.is_dir():
        raise RecipeError(f"{run_path}: not a run directory; pass runs/<run id>")
    require_run_directory(run_path)  # before the lock: a folder that is no run gets no lock file
    rundir = open_rundir(run_path)
    try:
        check_resumable(run_path)  # again under the lock: another writer may have just ended it
        recipe = load_recipe(run_path / "recipe.toml")
        return Run(prepare(recipe), rundir, resume=True)
    except BaseException:
        rundir.close()
        raise


def open_rundir(run_path: Path, lock: bool = True) -> RunDir:
    try:
        return RunDir.open(run_path, lock=lock)
    except OSError as exc:
        raise RecipeError(f"{run_path}: cannot write to the run directory: {os_reason(exc)}") from None


def alive_on_this_host(status: dict) -> bool:
    from bcdcore.rundir import pid_alive
    return status.get("host") == socket.gethostname() and pid_alive(status.get("pid"))


def require_run_directory(run_path: Path) -> None:
    """A RecipeError unless run_path looks like a run directory (checked before its lock file is made)."""
    if not (Path(run_path) / "status.json").exists() and not (Path(run_path) / "metrics.jsonl").exists():
        raise RecipeError(f"{run_path}: not a run directory (no status.json)")


def check_resumable(run_path: Path) -> Path:
    """The run directory, if --resume may continue it; else a RecipeError saying why not. Called with the
    run's writer lock held, so a live writer has been refused already."""
    run_path = Path(run_path)
    require_run_directory(run_path)
    status, problem = read_status_checked(run_path)
    if problem:
        raise RecipeError(f"{run_path}: cannot resume: {problem}")
    if status.get("state") == "finished":
        raise RecipeError(f"{run_path}: the run already finished; start a new run instead of --resume")
    if status.get("state") == "running" and alive_on_this_host(status):
        raise RecipeError(f"{run_path}: the run is still running (pid {status.get('pid')})")
    if not (run_path / "checkpoint.pt").is_file():
        raise RecipeError(f"{run_path}: no checkpoint.pt to resume from")
    return run_path
