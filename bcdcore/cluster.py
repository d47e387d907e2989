"""`bcdcore sweep --slurm`: a recipe's [sweep] grid as cluster jobs, submitted through submitit.

The grid's points are cut into jobs of `slots_per_job` points (1: one job per point). Each job runs its points
on the node it gets with the same scheduler `bcdcore sweep` uses locally (`run_job`): one slot per GPU of the
job (or the CPU), several points per slot when the job has more slots than GPUs. Every point is an ordinary
`bcdcore run RECIPE --sweep-point --set ...` whose run directory goes into the sweep directory (a file system
the cluster's nodes share), so `bcdcore ls` and bcdtui list the runs as they appear.

This process stays and watches: it polls the jobs' states (submitit asks sacct), reads each point's run
directory from its log (`run directory: PATH`) and state from that run's status.json, and records all of it
in sweep.json (written atomically; the one writer). SIGINT/SIGTERM cancels every job that has not ended
(Slurm sends the runs SIGTERM; they checkpoint and mark themselves killed) and records `cancelled`.
bcdtui cancels one job with `scancel` (or, for the local executor, SIGINT to its controller).

`--slurm-executor local` (hidden, for tests and machines without Slurm) runs the same jobs with submitit's
local executor: each job is a local process, its id that process's pid.

submitit is imported only here, only for `sweep --slurm` (`pip install submitit`). It pickles the job
function (`run_job`, by reference) and its arguments (lists of strings) into the sweep's own `submitit/`
folder, and the job's result back; this process never loads a job's result, only states.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bcdcore.recipe import Recipe, RecipeError, expand_grid
from bcdcore.rundir import read_status, run_id_for, unique_dir, write_json_atomic
from bcdcore.scheduler import Scheduler, Task, cpu_slot, gpu_slot, point_overrides, read_run_directory, run_command
from bcdcore.sweepfile import TERMINAL_JOB_STATES, job_state

EXECUTORS = ("slurm", "local")


@dataclass
class ClusterOptions:
    partition: str | None = None
    gpus_per_job: int = 1
    time_min: int = 60
    account: str | None = None
    slots_per_job: int = 1
    executor: str = "slurm"  # "local": submitit's local executor (tests; a machine without Slurm)

    def check(self) -> None:
        """One RecipeError line for a bad option, a missing submitit, or Slurm missing from this machine."""
        if self.gpus_per_job < 0:
            raise RecipeError(f"--gpus-per-job must be >= 0, got {self.gpus_per_job}")
        if self.time_min < 1:
            raise RecipeError(f"--time must be >= 1 minute, got {self.time_min}")
        if self.slots_per_job < 1:
            raise RecipeError(f"--slots-per-job must be >= 1, got {self.slots_per_job}")
        if self.executor not in EXECUTORS:
            raise RecipeError(f"--slurm-executor {self.executor!r}: choose one of {', '.join(EXECUTORS)}")
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise RecipeError("sweep --slurm needs submitit: pip install submitit") from None
        if self.executor == "slurm" and (shutil.which("sbatch") is None or shutil.which("srun") is None):
            raise RecipeError("sweep --slurm: no `sbatch` on PATH (not a Slurm login node); run the sweep there, "
                              "or without --slurm on this machine's GPUs")


@dataclass
class Job:
    points: list[int]
    job_id: str | None = None
    state: str = "unsubmitted"  # queued | running | done | failed | cancelled | unknown (sweepfile.job_state)
    scheduler_state: str = ""  # the scheduler's own word: PENDING, RUNNING, COMPLETED, FINISHED, ...
    handle: object = field(default=None, repr=False)  # the submitit job


def run_job(commands: list[list[str]], logs: list[str], gpus: int, per_slot: int, poll_s: float = 0.5) -> list:
    """Inside a cluster job: run `commands` (`bcdcore run ...` argument lists) over the job's slots, at most
    `per_slot` at once on each GPU (or on the CPU when `gpus` is 0); returns their exit codes. SIGTERM/SIGINT
    (scancel, a cancelled local job) sends SIGTERM to every run, which checkpoints and marks itself killed."""
    slots = [gpu_slot(str(i)) for i in range(gpus)] or [cpu_slot(cuda_visible=None)]
    scheduler = Scheduler(slots, per_slot, grace_s=60.0)
    tasks = [scheduler.submit(Task(args=list(c), out_path=str(o))) for c, o in zip(commands, logs)]
    stop: list[int] = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: stop.append(signum))
    while (scheduler.queued() or scheduler.running()) and not stop:
        scheduler.tick()
        time.sleep(poll_s)
    if stop:
        scheduler.stop(60.0, poll_s)
    return [t.exit_code for t in tasks]


@contextlib.contextmanager
def _stderr_to(path: Path):
    """File descriptor 2 into `path` for a while: submitit lets sbatch write to our stderr, and a refusal is
    reported in one line of ours (the file keeps sbatch's words)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class ClusterSweep:
    """The grid as submitit jobs, watched until every job has ended; sweep.json is kept up to date."""

    def __init__(self, recipe_path: Path, recipe: Recipe, runs_dir: Path, options: ClusterOptions,
                 overrides: list[str] = (), poll_s: float = 5.0) -> None:
        self.recipe_path, self.options = Path(recipe_path), options
        self.overrides = list(overrides)
        self.poll_s = poll_s
        self.points = [{"index": i, "overrides": p, "state": "pending", "run_dir": None, "exit_code": None,
                        "job_id": None} for i, p in enumerate(expand_grid(recipe.sweep))]
        n = options.slots_per_job
        self.jobs = [Job(list(range(i, min(i + n, len(self.points))))) for i in range(0, len(self.points), n)]
        self.stop_signal: int | None = None
        self.dir = unique_dir(Path(runs_dir), run_id_for(f"{recipe.run.name}-sweep", recipe.digest()))
        (self.dir / "logs").mkdir()
        self.save()

    def command(self, index: int) -> list[str]:
        return run_command(recipe=self.recipe_path.resolve(), runs_dir=self.dir.resolve(), sweep_point=True,
                           overrides=[*self.overrides, *point_overrides(self.points[index]["overrides"])])

    def log_path(self, index: int) -> Path:
        return (self.dir / "logs" / f"point-{index}.out").resolve()

    def executor(self):
        import submitit

        o = self.options
        folder = self.dir / "submitit"
        if o.executor == "local":
            ex = submitit.LocalExecutor(folder=folder)
            ex.update_parameters(timeout_min=o.time_min, gpus_per_node=o.gpus_per_job)
        else:
            ex = submitit.SlurmExecutor(folder=folder)
            params = {"time": o.time_min, "gpus_per_node": o.gpus_per_job or None, "ntasks_per_node": 1,
                      "job_name": self.dir.name, "partition": o.partition, "account": o.account}
            ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return ex

    def submit(self, report=print) -> None:
        ex = self.executor()
        gpus = self.options.gpus_per_job
        per_slot = math.ceil(self.options.slots_per_job / gpus) if gpus else self.options.slots_per_job
        for n, job in enumerate(self.jobs):
            try:
                with _stderr_to(self.dir / "submitit-sbatch.err"):  # sbatch's own complaints: in our one line
                    job.handle = ex.submit(run_job, [self.command(i) for i in job.points],
                                           [str(self.log_path(i)) for i in job.points], gpus, per_slot)
            except Exception as exc:  # sbatch refused it (partition, account, limits): nothing half-submitted
                self.cancel(report)
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                raise RecipeError(f"job {n + 1} of {len(self.jobs)} was refused: "
                                  f"{lines[-1] if lines else type(exc).__name__}; check --partition, --account, "
                                  f"--time and --gpus-per-job (sweep directory {self.dir})") from None
            job.job_id, job.state = str(job.handle.job_id), "queued"
            for i in job.points:
                self.points[i]["job_id"], self.points[i]["state"] = job.job_id, "queued"
            report(f"submitted job {job.job_id}: point(s) {', '.join(str(i + 1) for i in job.points)}")
            self.save()

    def poll(self) -> bool:
        """Refresh every job's and point's state; True when something changed."""
        changed = False
        for job in self.jobs:
            if job.handle is None or job.state in TERMINAL_JOB_STATES:
                continue
            raw = str(job.handle.state)
            state = job_state(raw)
            if (state, raw) != (job.state, job.scheduler_state):
                job.state, job.scheduler_state, changed = state, raw, True
        for job in self.jobs:
            for i in job.points:
                changed |= self._poll_point(self.points[i], job)
        return changed

    def _poll_point(self, point: dict, job: Job) -> bool:
        before = dict(point)
        if point["run_dir"] is None:
            point["run_dir"] = read_run_directory(self.log_path(point["index"]))
        status = read_status(Path(point["run_dir"])) if point["run_dir"] else {}
        run_state = status.get("state")
        if run_state in ("finished", "failed", "killed"):
            point["state"], point["exit_code"] = "done", status.get("exit_code")
        elif job.state in TERMINAL_JOB_STATES:
            point["state"] = "done" if point["run_dir"] else "not started"
        elif run_state is not None or job.state == "running":
            point["state"] = "running"
        return point != before

    def save(self) -> None:
        o = self.options
        write_json_atomic(self.dir / "sweep.json", {
            "recipe": str(self.recipe_path), "overrides": self.overrides, "slots": [],
            "watcher": {"host": socket.gethostname(), "pid": os.getpid()},  # readers tell a stale file
            "cluster": {"executor": o.executor, "partition": o.partition, "gpus_per_job": o.gpus_per_job,
                        "time_min": o.time_min, "account": o.account, "slots_per_job": o.slots_per_job},
            "jobs": [{"job_id": j.job_id, "state": j.state, "scheduler_state": j.scheduler_state,
                      "points": j.points} for j in self.jobs],
            "points": self.points})

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def run(self, report=print) -> int:
        """Submit, then watch until every job has ended (or a signal cancels them). 0 when every run
        finished, 1 otherwise, 128 + signal when stopped."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.submit(report)
            while self.stop_signal is None:
                if self.poll():
                    self.save()
                if all(j.state in TERMINAL_JOB_STATES for j in self.jobs):
                    break
                time.sleep(self.poll_s)
            if self.stop_signal is not None:
                self.cancel(report)
                return 128 + self.stop_signal
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        self.poll()
        self.save()
        return 0 if all(p["exit_code"] == 0 for p in self.points) else 1

    def cancel(self, report=print) -> None:
        live = [j for j in self.jobs if j.handle is not None and j.state not in TERMINAL_JOB_STATES]
        if live:
            report(f"stopping: cancelling {len(live)} job(s)")
        for job in live:
            try:
                job.handle.cancel(check=False)
            except Exception as exc:  # scancel refused (job already gone): the state poll says what happened
                report(f"job {job.job_id}: cancel failed: {str(exc).splitlines()[0] if str(exc) else exc}")
            job.state = "cancelled"
        deadline = time.monotonic() + 30  # the runs checkpoint and record `killed`
        while time.monotonic() < deadline and any(
                (read_status(Path(p["run_dir"])).get("state") == "running") for p in self.points if p["run_dir"]):
            time.sleep(0.5)
        for job in self.jobs:
            for i in job.points:
                self._poll_point(self.points[i], job)
        self.save()
