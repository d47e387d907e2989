"""The workstation's launches: bcdcore.scheduler's queue (slots, processes, kill) plus what a TUI adds to it.

Plain Python (no Textual, no torch): the UI calls these methods and so do the tests. The scheduler starts every
run as a detached `bcdcore run` (own session, argument list, CUDA_VISIBLE_DEVICES naming its slot), exactly as
`bcdcore sweep` does. What this module adds: launch files under `<runs>/.bcdtui/launches/` (each run's stdout
and stderr; its first line, `run directory: PATH`, links the job to its run directory), the queue kept in
`<runs>/.bcdtui/queue.json` so that a restarted workstation carries on with it, runs started elsewhere counted
against their slot, and kill / rerun / resume / delete addressed by run directory.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from bcdcore.recipe import os_reason
from bcdcore.rundir import list_runs, pid_alive, read_status, read_status_checked, run_state
from bcdcore.scheduler import (
    CPU_SLOT,
    KillRequest,
    Scheduler,
    SchedulerError,
    Slot,
    Task,
    cpu_slot,
    is_zombie,
    read_run_directory,
    reap_pid,
    run_command,
    slot_key_for_gpu,
)
from bcdtui.slots import detect_slots, parse_nvidia_smi

# the scheduler's names that the TUI (and its tests) use through this module
__all__ = ["CPU_SLOT", "LIVE_STATES", "Job", "KillRequest", "LaunchSpec", "Runner", "RunnerError", "Slot", "cpu_slot",
           "detect_slots", "is_zombie", "last_error_line", "parse_nvidia_smi",
           "read_launch_run_dir", "reap_pid", "slot_key_for_gpu"]

LIVE_STATES = ("queued", "running")
RunnerError = SchedulerError  # a refused action (deleting a live run, killing one that is not running...)


@dataclass
class LaunchSpec:
    """What to start: `bcdcore run RECIPE --set ...` (a sweep point with `sweep_point`) or
    `bcdcore run --resume RUN_DIR`."""

    recipe: str = ""  # absolute path of the recipe file ("" with resume)
    overrides: list[str] = field(default_factory=list)
    resume: str = ""  # absolute run directory to resume ("" for a new run)
    label: str = ""  # what the table shows before the run directory exists
    slots: list[str] = field(default_factory=list)  # allowed slot keys; empty = any
    sweep_point: bool = False  # the recipe has a [sweep] table and the overrides name one of its points


@dataclass
class Job(Task):
    """One launch through the queue. States: queued (waiting for a slot) -> starting (process started, run
    directory not known yet) -> started (run directory known) -> exited; `error` when it could not start or
    exited before it made a run directory (a recipe error: `error` holds the engine's line)."""

    RUNNING = "starting"  # the state the scheduler gives a job it starts

    spec: LaunchSpec = field(default_factory=LaunchSpec)
    run_dir: str = ""
    submitted: float = 0.0

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "started")


def read_launch_run_dir(out_path: Path, cwd: Path) -> Path | None:
    """The run directory a launch file names (None until its line is written); relative to the run's cwd."""
    printed = read_run_directory(out_path)
    if printed is None:
        return None
    path = Path(printed)
    return path if path.is_absolute() else cwd / path


def last_error_line(out_path: Path | str) -> str:
    """The engine's one-line error (exit 2) or the last line of a traceback."""
    try:
        lines = [l.strip() for l in Path(out_path).read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1] if lines else ""


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


class Runner:
    """Launches, watches and stops runs. Call `tick()` periodically (the UI does it every refresh): it starts
    queued jobs when a slot has room, links started jobs to their run directories, reaps exited processes and
    sends SIGKILL to runs that outlived their kill grace period."""

    def __init__(self, runs_dir: Path, *, slots: list[Slot] | None = None, per_slot: int = 1,
                 engine: list[str] | None = None, cwd: Path | None = None, grace_s: float = 30.0,
                 env: dict[str, str] | None = None, clock: Callable[[], float] = time.monotonic,
                 restore_queue: bool = True) -> None:
        self.runs_dir = Path(runs_dir).resolve()
        self.engine = list(engine) if engine else [sys.executable, "-m", "bcdcore"]
        self.cwd = Path(cwd) if cwd else Path.cwd()
        self.scheduler = Scheduler(list(slots) if slots is not None else detect_slots(), per_slot, cwd=self.cwd,
                                   env=env, grace_s=grace_s, clock=clock)
        self.jobs: dict[str, Job] = self.scheduler.tasks  # type: ignore[assignment]  # the scheduler's own queue
        self._host = socket.gethostname()
        if restore_queue:
            self._load_queue()

    # the scheduler's settings, readable and settable here (the UI changes per_slot; tests change env)
    slots = property(lambda self: self.scheduler.slots)
    kills = property(lambda self: self.scheduler.kills)
    messages = property(lambda self: self.scheduler.messages)  # the UI drains them as notifications
    per_slot = property(lambda self: self.scheduler.per_slot,
                        lambda self, n: setattr(self.scheduler, "per_slot", int(n)))
    grace_s = property(lambda self: self.scheduler.grace_s, lambda self, s: setattr(self.scheduler, "grace_s", s))
    env = property(lambda self: self.scheduler.env, lambda self, e: setattr(self.scheduler, "env", e))

    # --- paths
    @property
    def state_dir(self) -> Path:
        return self.runs_dir / ".bcdtui"

    @property
    def queue_file(self) -> Path:
        return self.state_dir / "queue.json"

    def slot(self, key: str) -> Slot | None:
        return self.scheduler.slot(key)

    # --- queue
    def submit(self, spec: LaunchSpec, job_id: str | None = None, submitted: float | None = None) -> Job:
        """Queue one launch; it starts at the next `tick()` when one of its slots has room."""
        if spec.recipe:
            spec.recipe = str(Path(spec.recipe).resolve())
        if spec.resume:
            spec.resume = str(Path(spec.resume).resolve())
        job = Job(spec=spec, slots=list(spec.slots), submitted=time.time() if submitted is None else submitted,
                  args=run_command(self.engine, spec.recipe, runs_dir=self.runs_dir, overrides=spec.overrides,
                                   resume=spec.resume or None, sweep_point=spec.sweep_point))
        if job_id:
            job.id = job_id
        self.scheduler.submit(job)
        self.save_queue()
        return job

    def cancel(self, job_id: str) -> None:
        self.scheduler.cancel(job_id)
        self.save_queue()

    def queued(self) -> list[Job]:
        return self.scheduler.queued()  # type: ignore[return-value]

    def pending(self) -> list[Job]:
        """Jobs without a run directory yet (queued, starting, or failed to start)."""
        return [j for j in self.jobs.values() if not j.run_dir and j.state in ("queued", "starting", "error")]

    def save_queue(self) -> None:
        data = [{"id": j.id, "submitted": j.submitted, "spec": asdict(j.spec)} for j in self.queued()]
        try:
            if not data and not self.queue_file.exists():
                return
            _ensure_dir(self.state_dir)
            tmp = self.queue_file.with_name(f".queue.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.queue_file)
        except OSError as exc:
            self.messages.append(f"could not save the launch queue: {exc}")

    def _load_queue(self) -> None:
        """The saved queue; an entry that is not what `save_queue` writes is dropped (any bytes may be there)."""
        try:
            data = json.loads(self.queue_file.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            return
        for item in data if isinstance(data, list) else []:
            spec = _queued_spec(item)
            if spec is None:
                continue
            spec.slots = [s for s in spec.slots if self.slot(s) is not None]
            submitted = item.get("submitted")
            submitted = float(submitted) if isinstance(submitted, (int, float)) and not isinstance(
                submitted, bool) and abs(submitted) < 1e12 else 0.0
            self.submit(spec, job_id=item["id"], submitted=submitted)

    # --- capacity
    def usage(self, runs: Iterable[tuple[str, str]] = ()) -> dict[str, int]:
        """Live runs per slot: this runner's started jobs plus `runs` = (run_dir, gpu) of other live runs
        (re-attached after a restart, or started outside the workstation)."""
        return self.scheduler.usage(self._others(runs))

    def _others(self, runs: Iterable[tuple[str, str]]) -> list[str]:
        """The slot keys of `runs` that are not this runner's own jobs (run directories all lie in runs_dir,
        so their names identify them however the paths are spelled)."""
        own = {Path(j.run_dir).name for j in self.jobs.values() if j.alive and j.run_dir}
        return [slot_key_for_gpu(gpu) for run_dir, gpu in runs if Path(run_dir).name not in own]

    def live_runs(self) -> list[tuple[str, str]]:
        """(run_dir, gpu) of the runs in the runs directory whose process is alive on this host."""
        out = []
        for path in list_runs(self.runs_dir):
            status = read_status(path)
            if status.get("state") in LIVE_STATES and status.get("host") in (None, self._host) \
                    and pid_alive(status.get("pid")):
                out.append((str(path), status.get("gpu") or ""))
        return out

    # --- the periodic step
    def tick(self, live: Iterable[tuple[str, str]] | None = None) -> bool:
        """Advance every job; returns True when anything changed. `live` = (run_dir, gpu) of the live runs the
        caller already knows (saves a scan of the runs directory); None scans."""
        changed = False
        for job in list(self.jobs.values()):
            if job.alive and not job.run_dir:
                changed |= self._link(job)
        others = self._others(self.live_runs() if live is None else live) if self.queued() else ()
        for job in self.queued():  # each launch writes its output into a file of its own, named when it starts
            job.out_path = str(self.state_dir / "launches" / f"{time.strftime('%Y%m%d-%H%M%S')}-{job.id}.out")
        step = self.scheduler.tick(others)
        for job in step.ended:
            self._ended(job)  # type: ignore[arg-type]
        for job in step.started:
            self._link(job)  # type: ignore[arg-type]
        if step.started or any(j.state == "error" for j in step.ended):
            self.save_queue()
        return changed or step.changed

    def _link(self, job: Job) -> bool:
        """Read the run directory from the job's launch file; True when it was found just now."""
        run_dir = read_launch_run_dir(Path(job.out_path), self.cwd) if job.out_path else None
        if not run_dir:
            return False
        job.run_dir = str(run_dir)
        if job.state == "starting":
            job.state = "started"
        # a resume writes into the directory of an earlier job of ours: that job (exited) no longer speaks
        # for the run, so forget it; this job's pid is the run's now
        for old in [j for j in self.jobs.values() if j is not job and j.run_dir and j.state in ("exited", "error")
                    and Path(j.run_dir).name == Path(job.run_dir).name]:
            del self.jobs[old.id]
        return True

    def _ended(self, job: Job) -> None:
        """A job's process exited (or never started): it ran (it has a run directory) or it is an error."""
        if job.state == "error":
            return  # could not start: the scheduler said why
        if not job.run_dir:
            self._link(job)
        if job.run_dir:
            job.state = "exited"
        else:
            job.state = "error"
            job.error = last_error_line(Path(job.out_path)) or f"exited with code {job.exit_code} before starting"
            self.messages.append(f"{job.spec.label or job.id}: {job.error}")

    # --- kill
    def kill(self, run_dir: Path | str | None = None, *, job_id: str | None = None,
             grace_s: float | None = None) -> KillRequest | None:
        """SIGTERM to the run's process group (the engine finishes its round, checkpoints, marks `killed`);
        SIGKILL follows at the first tick after `grace_s`. A queued launch is cancelled instead (returns None)."""
        job = self.jobs.get(job_id) if job_id else self.job_for(run_dir) if run_dir else None
        if job is not None and job.state == "queued":
            self.cancel(job.id)
            return None
        pid, run_path = None, str(run_dir or (job.run_dir if job else ""))
        if job is not None and job.alive:
            pid = job.pid
        elif run_dir:
            status = read_status(Path(run_dir))
            if status.get("state") in LIVE_STATES and status.get("host") in (None, self._host) \
                    and pid_alive(status.get("pid")):
                pid = int(status["pid"])
        if not pid or not pid_alive(pid):
            if run_dir:
                status, problem = read_status_checked(Path(run_dir))
                shown = run_state(status, Path(run_dir), problem)
                if shown.holder is not None and shown.state in LIVE_STATES:
                    raise RunnerError(f"{Path(run_dir).name} is written by {shown.holder} on another host or "
                                      "outside this session: kill it there")
                raise RunnerError(f"{Path(run_dir).name} is {shown.state}, not running: nothing to kill")
            raise RunnerError("that run is not running here: nothing to kill")
        return self.scheduler.kill(pid, grace_s=grace_s, label=Path(run_path).name)

    # --- rerun, resume, delete
    def rerun(self, run_dir: Path | str, overrides: list[str] | None = None, slots: list[str] | None = None) -> Job:
        """A new run of the resolved recipe this run ran (its recipe.toml), plus any overrides."""
        recipe = Path(run_dir) / "recipe.toml"
        if not recipe.is_file():
            raise RunnerError(f"{Path(run_dir).name} has no recipe.toml to run again")
        name = read_status(Path(run_dir)).get("recipe") or Path(run_dir).name
        return self.submit(LaunchSpec(recipe=str(recipe), overrides=list(overrides or []),
                                      label=f"{name} (rerun)", slots=list(slots or [])))

    def resume(self, run_dir: Path | str, slots: list[str] | None = None) -> Job:
        path = Path(run_dir)
        status, problem = read_status_checked(path)
        shown = run_state(status, path, problem)
        if shown.holder is not None:
            raise RunnerError(f"{path.name} is being written by {shown.holder}; kill it before resuming")
        if shown.state in LIVE_STATES:
            raise RunnerError(f"{path.name} is still {shown.state}; kill it before resuming")
        if shown.state == "finished":
            raise RunnerError(f"{path.name} finished: nothing to resume (r reruns it; to train longer, rerun "
                              "with more run.rounds)")
        if shown.state == "unreadable":
            raise RunnerError(f"{path.name} cannot be resumed: its status is unreadable ({shown.reason})")
        if not (path / "checkpoint.pt").is_file():
            raise RunnerError(f"{path.name} has no checkpoint.pt to resume from")
        return self.submit(LaunchSpec(resume=str(path), label=f"{path.name} (resume)", slots=list(slots or [])))

    def delete(self, run_dir: Path | str) -> None:
        """Remove a run directory. Refused while its process lives (kill it first)."""
        path = Path(run_dir).resolve()
        if path.parent != self.runs_dir or not path.is_dir() or not (
                os.path.lexists(path / "status.json") or os.path.lexists(path / "metrics.jsonl")):
            raise RunnerError(f"{path} is not a run directory of {self.runs_dir}")
        job = self.job_for(path)
        status, problem = read_status_checked(path)
        shown = run_state(status, path, problem)
        if shown.holder is not None:
            raise RunnerError(f"{path.name} is being written by {shown.holder}; kill it before deleting")
        if (job is not None and job.alive) or (shown.state in LIVE_STATES and pid_alive(status.get("pid"))):
            raise RunnerError(f"{path.name} is still running; kill it before deleting")
        try:
            shutil.rmtree(path)
        except OSError as exc:
            raise RunnerError(f"could not delete {path.name}: {os_reason(exc, with_path=False)}") from None
        if job is not None:
            del self.jobs[job.id]

    def job_for(self, run_dir: Path | str | None) -> Job | None:
        if not run_dir:
            return None
        target = str(Path(run_dir).resolve())
        mine = [j for j in self.jobs.values() if j.run_dir and str(Path(j.run_dir).resolve()) == target]
        return next((j for j in reversed(mine) if j.alive), mine[-1] if mine else None)  # the newest, live first

    # --- re-attach
    def reap(self, pids: Iterable[int]) -> None:
        """Collect exited children this process started in an earlier Runner (e.g. a restarted app in the same
        process), so that they do not linger as zombies that look alive."""
        for pid in pids:
            reap_pid(pid)

    def drain_messages(self) -> list[str]:
        return self.scheduler.drain_messages()


# ----------------------------------------------------------------------------------------------------------
# helpers

def _queued_spec(item) -> LaunchSpec | None:
    """The LaunchSpec of one saved queue entry, or None when it is not one (strings and lists of strings)."""
    if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not isinstance(item.get("spec"), dict):
        return None
    spec = item["spec"]
    kinds = {"recipe": str, "resume": str, "label": str, "overrides": list, "slots": list, "sweep_point": bool}
    if set(spec) - set(kinds) or not all(isinstance(spec[k], kinds[k]) for k in spec):
        return None
    if not all(isinstance(v, str) and "\x00" not in v for k in ("overrides", "slots") for v in spec.get(k, [])):
        return None
    if any("\x00" in spec.get(k, "") for k in ("recipe", "resume")) or not (spec.get("recipe") or spec.get("resume")):
        return None
    return LaunchSpec(**spec)
