"""Reading a sweep directory's cluster jobs from sweep.json (`bcdcore sweep --slurm` writes them). A plain
reader for bcdcore and bcdtui alike: no torch, no submitit, and it never raises on file contents: a missing,
broken or foreign sweep.json gives no jobs and a `problem` line.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from bcdcore.recipe import os_reason
from bcdcore.records import RecordError, decode_object, plain
from bcdcore.rundir import pid_alive
from bcdcore.runfiles import read_file_bytes

SWEEP_FILE = "sweep.json"
MAX_SWEEP_FILE = 64 << 20
TERMINAL_JOB_STATES = ("done", "failed", "cancelled")
LIVE_JOB_STATES = ("queued", "running", "unknown")

# the schedulers' words (Slurm's sacct states, submitit's local executor's) -> ours
_STATES = {
    "PENDING": "queued", "CONFIGURING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued",
    "RESV_DEL_HOLD": "queued", "SUSPENDED": "queued", "READY": "queued",
    "RUNNING": "running", "COMPLETING": "running", "STAGE_OUT": "running", "SIGNALING": "running",
    "COMPLETED": "done", "FINISHED": "done",
    "FAILED": "failed", "TIMEOUT": "failed", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed",
    "BOOT_FAIL": "failed", "DEADLINE": "failed", "PREEMPTED": "failed",
    "CANCELLED": "cancelled", "INTERRUPTED": "cancelled", "REVOKED": "cancelled",
}


def job_state(scheduler_state: str) -> str:
    """Our word for a scheduler's job state ("CANCELLED by 1234" -> cancelled); unknown words -> unknown."""
    words = str(scheduler_state).strip().upper().split()
    return _STATES.get(words[0].rstrip("+"), "unknown") if words else "unknown"


@dataclass
class ClusterJob:
    sweep_dir: Path
    executor: str  # "slurm" | "local"
    job_id: str
    state: str  # queued | running | done | failed | cancelled | unknown
    scheduler_state: str
    points: list[int]
    run_dirs: list[str] = field(default_factory=list)  # the runs of its points that have started

    @property
    def live(self) -> bool:
        return self.state in LIVE_JOB_STATES


@dataclass
class SweepJobs:
    sweep_dir: Path
    executor: str | None  # None: not a cluster sweep
    jobs: list[ClusterJob]
    problem: str | None = None
    watched: bool | None = None  # its `bcdcore sweep --slurm` is alive (None: it runs on another host)


def read_sweep_jobs(sweep_dir: Path) -> SweepJobs:
    """The cluster jobs recorded in SWEEP_DIR/sweep.json, never raising on its contents: entries that do not
    have the expected shape are skipped."""
    sweep_dir = Path(sweep_dir)
    try:
        data = plain(decode_object(read_file_bytes(sweep_dir / SWEEP_FILE, MAX_SWEEP_FILE), SWEEP_FILE))
    except OSError as exc:
        return SweepJobs(sweep_dir, None, [], f"{SWEEP_FILE}: {os_reason(exc, with_path=False)}")
    except RecordError as exc:
        return SweepJobs(sweep_dir, None, [], f"{SWEEP_FILE}: {exc}")
    cluster = data.get("cluster")
    if not isinstance(cluster, dict):
        return SweepJobs(sweep_dir, None, [])
    executor = cluster.get("executor") if cluster.get("executor") in ("slurm", "local") else "slurm"
    points = {p.get("index"): p for p in data.get("points", []) if isinstance(p, dict)} \
        if isinstance(data.get("points"), list) else {}
    jobs = []
    for raw in data.get("jobs", []) if isinstance(data.get("jobs"), list) else []:
        if not isinstance(raw, dict) or not _job_id_ok(raw.get("job_id")):
            continue
        indices = [i for i in raw.get("points", []) if isinstance(i, int) and not isinstance(i, bool)] \
            if isinstance(raw.get("points"), list) else []
        state = raw.get("state") if raw.get("state") in (*LIVE_JOB_STATES, *TERMINAL_JOB_STATES) else "unknown"
        run_dirs = [points[i]["run_dir"] for i in indices
                    if isinstance(points.get(i, {}).get("run_dir"), str) and points[i]["run_dir"]]
        jobs.append(ClusterJob(sweep_dir, executor, str(raw["job_id"]), state,
                               str(raw.get("scheduler_state") or ""), indices, run_dirs))
    return SweepJobs(sweep_dir, executor, jobs, watched=_watched(data.get("watcher")))


def _watched(watcher) -> bool | None:
    """Whether the process that keeps sweep.json up to date is alive; None where it is not on this host."""
    if not isinstance(watcher, dict) or watcher.get("host") != socket.gethostname():
        return None
    return pid_alive(watcher.get("pid"))


def _job_id_ok(job_id) -> bool:
    """Slurm ids are digits (array jobs: 123_4); local jobs are pids. Anything else is not ours to act on."""
    return isinstance(job_id, str) and 0 < len(job_id) <= 32 and job_id.replace("_", "").isdigit()


def cluster_sweeps(runs_dir: Path) -> list[SweepJobs]:
    """Every sweep directory under runs_dir that records cluster jobs (sorted by name); never raises."""
    out = []
    try:
        names = sorted(os.listdir(runs_dir))
    except OSError:
        return out
    for name in names:
        path = Path(runs_dir) / name
        if os.path.lexists(path / SWEEP_FILE):
            sweep = read_sweep_jobs(path)
            if sweep.executor is not None or sweep.problem:
                out.append(sweep)
    return out
