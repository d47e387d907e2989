"""Cluster jobs of `bcdcore sweep --slurm` sweeps, for the TUI: which are queued or running (from each sweep's
sweep.json, through bcdcore.sweepfile, and the runs' own status.json), and cancelling one. Plain class, no
Textual: tests drive it without a terminal.

Cancelling asks the scheduler, never a shell: `scancel JOB_ID` (an argument list) for Slurm jobs; for jobs of
submitit's local executor (tests, a machine without Slurm) SIGINT to the job's controller process, only when
that pid is still a submitit process (a recycled pid is left alone). The sweep's own `bcdcore sweep --slurm`
process sees the job end and records it in sweep.json; the runs get SIGTERM, checkpoint and mark themselves
killed.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bcdcore.rundir import read_status
from bcdcore.sweepfile import ClusterJob, cluster_sweeps


@dataclass
class JobRow:
    sweep: str  # the sweep directory's name
    job: ClusterJob
    runs: str  # the states of the job's runs, e.g. "2 running, 1 finished" (or "not started")

    def cells(self) -> tuple[str, ...]:
        points = ", ".join(str(i + 1) for i in self.job.points)
        return (self.sweep, self.job.job_id, self.job.executor, self.job.state, points, self.runs)


class ClusterJobs:
    """The cluster jobs under a runs directory; `live_only` keeps the queued and running ones."""

    COLUMNS = ("sweep", "job", "executor", "state", "points", "runs")

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = Path(runs_dir)
        self.rows: list[JobRow] = []
        self.problems: list[str] = []

    def refresh(self, live_only: bool = False) -> list[JobRow]:
        self.rows, self.problems = [], []
        for sweep in cluster_sweeps(self.runs_dir):
            if sweep.problem:
                self.problems.append(f"{sweep.sweep_dir.name}: {sweep.problem}")
            if sweep.watched is False and any(job.live for job in sweep.jobs):
                self.problems.append(f"{sweep.sweep_dir.name}: its `bcdcore sweep --slurm` has ended; job states "
                                     "may be stale")
            for job in sweep.jobs:
                if job.live or not live_only:
                    self.rows.append(JobRow(sweep.sweep_dir.name, job, _run_states(job)))
        return self.rows

    def cancel(self, row: JobRow) -> str:
        """Ask the scheduler to cancel the job; one line saying what happened (raises nothing)."""
        job = row.job
        if not job.live:
            return f"job {job.job_id} already ended ({job.state})"
        if job.executor == "local":
            return _cancel_local(job.job_id)
        scancel = shutil.which("scancel")
        if scancel is None:
            return f"job {job.job_id}: no `scancel` on PATH; cancel it from a Slurm login node"
        try:
            done = subprocess.run([scancel, job.job_id], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"job {job.job_id}: scancel failed: {exc}"
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            return f"job {job.job_id}: scancel failed: {lines[0] if lines else f'exit {done.returncode}'}"
        return f"cancelled job {job.job_id} (its runs checkpoint and stop)"


def run_entries(runs_dir: Path) -> tuple[list[os.DirEntry], list[str]]:
    """The runs directory's entries and those of its sweep directories (a sweep's runs, cluster or local, live
    inside it, next to sweep.json): where the runs table looks for run directories; and the sweep directories
    themselves (a reader watches their mtimes for new runs). Never raises."""
    try:
        entries = list(os.scandir(runs_dir))
    except OSError:
        return [], []
    sweeps = []
    for entry in list(entries):
        if not entry.name.startswith(".") and os.path.lexists(os.path.join(entry.path, "sweep.json")):
            sweeps.append(entry.path)
            try:
                entries.extend(os.scandir(entry.path))
            except OSError:
                pass
    return entries, sweeps


def _run_states(job: ClusterJob) -> str:
    if not job.run_dirs:
        return "not started"
    states: dict[str, int] = {}
    for run_dir in job.run_dirs:
        state = str(read_status(Path(run_dir)).get("state") or "unknown")
        states[state] = states.get(state, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in states.items())


def _cancel_local(job_id: str) -> str:
    try:
        with open(f"/proc/{int(job_id)}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ")
    except (OSError, ValueError):
        return f"job {job_id}: its process is gone (already ended)"
    if b"submitit" not in command:
        return f"job {job_id}: pid {job_id} is no longer a submitit job; left alone"
    try:
        os.kill(int(job_id), signal.SIGINT)
    except OSError as exc:
        return f"job {job_id}: cannot signal it: {exc.strerror or exc}"
    return f"cancelled job {job_id} (its runs checkpoint and stop)"
