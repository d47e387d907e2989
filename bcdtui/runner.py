"""Processes: GPU slots, a launch queue with a per-slot concurrency limit, detached runs, kill, rerun, delete.

Plain Python (no Textual, no torch): the UI calls these methods and so do the tests. Every run is a detached
`bcdcore run` subprocess (own session, argument list, never a shell string) with CUDA_VISIBLE_DEVICES naming
its slot. Its stdout/stderr go to a launch file under `<runs>/.bcdtui/launches/`, never to a pipe, so a run
outlives the workstation (a closed pipe would break the engine's last print); the first stdout line,
`run directory: PATH`, links the job to its run directory. The queue (jobs waiting for a free slot) is kept in
`<runs>/.bcdtui/queue.json` so a restarted workstation carries on with it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from bcdcore.recipe import os_reason
from bcdcore.rundir import list_runs, pid_alive, read_status, read_status_checked, run_state

CPU_SLOT = "cpu"
LIVE_STATES = ("queued", "running")


# ----------------------------------------------------------------------------------------------------------
# GPUs and slots

@dataclass(frozen=True)
class Slot:
    """Where a run goes: one GPU (CUDA_VISIBLE_DEVICES=<index>) or the CPU (CUDA_VISIBLE_DEVICES empty)."""

    key: str  # "gpu0", "gpu1", ... or "cpu"
    label: str  # "0: NVIDIA H100 (80 GiB)" or "CPU (2 cores)"
    cuda_visible: str  # value of CUDA_VISIBLE_DEVICES for runs in this slot

    @property
    def is_gpu(self) -> bool:
        return self.key != CPU_SLOT


def parse_nvidia_smi(text: str) -> list[Slot]:
    """Slots from `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits`."""
    slots = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        index, name = parts[0], parts[1]
        memory = ""
        if len(parts) > 2:
            try:
                memory = f" ({float(parts[2]) / 1024:.0f} GiB)"
            except ValueError:
                memory = ""
        slots.append(Slot(f"gpu{index}", f"{index}: {name}{memory}", index))
    return slots


def cpu_slot() -> Slot:
    return Slot(CPU_SLOT, f"CPU ({os.cpu_count() or 1} cores)", "")


def detect_slots(nvidia_smi: str | None = "nvidia-smi", timeout: float = 5.0) -> list[Slot]:
    """The GPUs nvidia-smi reports (in its order), else the one CPU slot."""
    exe = shutil.which(nvidia_smi) if nvidia_smi else None
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            slots = parse_nvidia_smi(out.stdout) if out.returncode == 0 else []
            if slots:
                return slots
        except (OSError, subprocess.SubprocessError):
            pass
    return [cpu_slot()]


def slot_key_for_gpu(gpu: str | None) -> str:
    """The slot a run occupies, from status.json's `gpu` (its CUDA_VISIBLE_DEVICES; empty on the CPU)."""
    gpu = (gpu or "").strip()
    return f"gpu{gpu.split(',')[0]}" if gpu else CPU_SLOT


# ----------------------------------------------------------------------------------------------------------
# Jobs

@dataclass
class LaunchSpec:
    """What to start: `bcdcore run RECIPE --set ...` or `bcdcore run --resume RUN_DIR`."""

    recipe: str = ""  # absolute path of the recipe file ("" with resume)
    overrides: list[str] = field(default_factory=list)
    resume: str = ""  # absolute run directory to resume ("" for a new run)
    label: str = ""  # what the table shows before the run directory exists
    slots: list[str] = field(default_factory=list)  # allowed slot keys; empty = any


@dataclass
class Job:
    """One launch through the queue. States: queued (waiting for a slot) -> starting (process started, run
    directory not known yet) -> started (run directory known) -> exited; `error` when it could not start or
    exited before it made a run directory (a recipe error: `error` holds the engine's line)."""

    id: str
    spec: LaunchSpec
    state: str = "queued"
    slot: str = ""
    pid: int | None = None
    run_dir: str = ""
    out_path: str = ""
    exit_code: int | None = None
    error: str = ""
    submitted: float = 0.0
    started: float = 0.0
    proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "started")


@dataclass
class KillRequest:
    pid: int
    group: bool  # signal the process group (the run is its session leader) or the pid alone
    deadline: float  # monotonic time after which SIGKILL follows
    run_dir: str = ""
    escalated: bool = False


class RunnerError(Exception):
    """A refused action (deleting a live run, killing a run that is not running...), phrased for the user."""


def format_override_value(value) -> str:
    """A Python value as the TOML text `--set KEY=VALUE` takes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and value != value:
            return "nan"
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_override_value(v) for v in value) + "]"
    raise TypeError(f"cannot pass {value!r} as a recipe value")


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
        self.slots = list(slots) if slots is not None else detect_slots()
        self.per_slot = max(1, int(per_slot))
        self.engine = list(engine) if engine else [sys.executable, "-m", "bcdcore"]
        self.cwd = Path(cwd) if cwd else Path.cwd()
        self.grace_s = grace_s
        self.env = env
        self.clock = clock
        self.jobs: dict[str, Job] = {}
        self.kills: dict[int, KillRequest] = {}
        self.messages: list[str] = []  # things the user should be told (the UI drains them as notifications)
        self._host = socket.gethostname()
        if restore_queue:
            self._load_queue()

    # --- paths
    @property
    def state_dir(self) -> Path:
        return self.runs_dir / ".bcdtui"

    @property
    def queue_file(self) -> Path:
        return self.state_dir / "queue.json"

    def slot(self, key: str) -> Slot | None:
        return next((s for s in self.slots if s.key == key), None)

    # --- queue
    def submit(self, spec: LaunchSpec) -> Job:
        """Queue one launch; it starts at the next `tick()` when one of its slots has room."""
        if spec.recipe:
            spec.recipe = str(Path(spec.recipe).resolve())
        if spec.resume:
            spec.resume = str(Path(spec.resume).resolve())
        unknown = [s for s in spec.slots if self.slot(s) is None]
        if unknown:
            raise RunnerError(f"unknown slot(s) {', '.join(unknown)}; this machine has "
                              f"{', '.join(s.key for s in self.slots)}")
        job = Job(id=uuid.uuid4().hex[:8], spec=spec, submitted=time.time())
        self.jobs[job.id] = job
        self._save_queue()
        return job

    def cancel(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.state != "queued":
            raise RunnerError("only a queued launch can be cancelled; kill a started run instead")
        del self.jobs[job_id]
        self._save_queue()

    def queued(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state == "queued"]

    def pending(self) -> list[Job]:
        """Jobs without a run directory yet (queued, starting, or failed to start)."""
        return [j for j in self.jobs.values() if not j.run_dir and j.state in ("queued", "starting", "error")]

    def _save_queue(self) -> None:
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
        """The saved queue; an entry that is not what `_save_queue` writes is dropped (any bytes may be there)."""
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
            self.jobs[item["id"]] = Job(id=item["id"], spec=spec, submitted=submitted)

    # --- capacity
    def usage(self, runs: Iterable[tuple[str, str]] = ()) -> dict[str, int]:
        """Live runs per slot: this runner's started jobs plus `runs` = (run_dir, gpu) of other live runs
        (re-attached after a restart, or started outside the workstation)."""
        counts = {s.key: 0 for s in self.slots}
        own = set()  # run directory names (all under runs_dir; paths may be spelled relative or absolute)
        for job in self.jobs.values():
            if job.alive:
                counts[job.slot] = counts.get(job.slot, 0) + 1
                if job.run_dir:
                    own.add(Path(job.run_dir).name)
        for run_dir, gpu in runs:
            if Path(run_dir).name in own:
                continue
            key = slot_key_for_gpu(gpu)
            if key in counts:
                counts[key] += 1
        return counts

    def live_runs(self) -> list[tuple[str, str]]:
        """(run_dir, gpu) of the runs in the runs directory whose process is alive on this host."""
        out = []
        for path in list_runs(self.runs_dir):
            status = read_status(path)
            if status.get("state") in LIVE_STATES and status.get("host") in (None, self._host) \
                    and pid_alive(status.get("pid")) and not is_zombie(status.get("pid")):
                out.append((str(path), status.get("gpu") or ""))
        return out

    def _free_slot(self, job: Job, counts: dict[str, int]) -> Slot | None:
        allowed = [s for s in self.slots if not job.spec.slots or s.key in job.spec.slots]
        free = [s for s in allowed if counts.get(s.key, 0) < self.per_slot]
        return min(free, key=lambda s: counts.get(s.key, 0)) if free else None

    # --- the periodic step
    def tick(self, live: Iterable[tuple[str, str]] | None = None) -> bool:
        """Advance every job; returns True when anything changed. `live` = (run_dir, gpu) of the live runs the
        caller already knows (saves a scan of the runs directory); None scans."""
        changed = False
        for job in list(self.jobs.values()):
            if job.state in ("starting", "started"):
                changed |= self._advance(job)
        changed |= self._escalate_kills()
        queued = self.queued()
        if queued:
            counts = self.usage(self.live_runs() if live is None else live)
            for job in queued:
                slot = self._free_slot(job, counts)
                if slot is None:
                    continue
                self._start(job, slot)
                counts[slot.key] = counts.get(slot.key, 0) + 1
                changed = True
            if changed:
                self._save_queue()
        return changed

    def _start(self, job: Job, slot: Slot) -> None:
        spec = job.spec
        out_dir = _ensure_dir(self.state_dir / "launches")
        out_path = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{job.id}.out"
        if spec.resume:
            args = [*self.engine, "run", "--resume", spec.resume, "--quiet"]
        else:
            args = [*self.engine, "run", spec.recipe, "--runs-dir", str(self.runs_dir), "--quiet"]
            for item in spec.overrides:
                args += ["--set", item]
        env = dict(os.environ if self.env is None else self.env)
        env["CUDA_VISIBLE_DEVICES"] = slot.cuda_visible
        env["PYTHONUNBUFFERED"] = "1"
        if not slot.is_gpu and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.per_slot))
        job.slot, job.out_path, job.started = slot.key, str(out_path), time.time()
        try:
            with open(out_path, "wb") as out:
                job.proc = subprocess.Popen(args, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except OSError as exc:
            job.state, job.error = "error", f"could not start {args[0]}: {exc}"
            self.messages.append(job.error)
            return
        job.pid = job.proc.pid
        job.state = "starting"

    def _advance(self, job: Job) -> bool:
        changed = False
        if not job.run_dir:
            run_dir = read_launch_run_dir(Path(job.out_path), self.cwd)
            if run_dir:
                job.run_dir, job.state, changed = str(run_dir), "started", True
        code = job.proc.poll() if job.proc is not None else (None if pid_alive(job.pid) else -1)
        if code is not None:
            job.exit_code = code
            if not job.run_dir:
                run_dir = read_launch_run_dir(Path(job.out_path), self.cwd)
                job.run_dir = str(run_dir) if run_dir else ""
            if job.run_dir:
                job.state = "exited"
            else:
                job.state = "error"
                job.error = last_error_line(Path(job.out_path)) or f"exited with code {code} before starting"
                self.messages.append(f"{job.spec.label or job.id}: {job.error}")
            self.kills.pop(job.pid or -1, None)
            changed = True
        return changed

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
            raise RunnerError("that run is not running here: nothing to kill")
        try:
            group = os.getpgid(pid) == pid
        except ProcessLookupError:
            raise RunnerError("that run has just ended: nothing to kill") from None
        request = KillRequest(pid=pid, group=group, run_dir=run_path,
                              deadline=self.clock() + (self.grace_s if grace_s is None else grace_s))
        _signal(pid, signal.SIGTERM, group)
        self.kills[pid] = request
        return request

    def _escalate_kills(self) -> bool:
        changed = False
        for pid, request in list(self.kills.items()):
            reap_pid(pid)
            if not pid_alive(pid) or is_zombie(pid):
                del self.kills[pid]
                changed = True
            elif not request.escalated and self.clock() >= request.deadline:
                _signal(pid, signal.SIGKILL, request.group)
                request.escalated = True
                self.messages.append(f"{Path(request.run_dir).name or pid}: still alive after the grace period; "
                                     "sent SIGKILL (the run will show as lost)")
                changed = True
        return changed

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
        return next((j for j in self.jobs.values() if j.run_dir and str(Path(j.run_dir).resolve()) == target), None)

    # --- re-attach
    def reap(self, pids: Iterable[int]) -> None:
        """Collect exited children this process started in an earlier Runner (e.g. a restarted app in the same
        process), so that they do not linger as zombies that look alive."""
        for pid in pids:
            reap_pid(pid)

    def drain_messages(self) -> list[str]:
        out, self.messages = self.messages, []
        return out


# ----------------------------------------------------------------------------------------------------------
# helpers

def _queued_spec(item) -> LaunchSpec | None:
    """The LaunchSpec of one saved queue entry, or None when it is not one (strings and lists of strings)."""
    if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not isinstance(item.get("spec"), dict):
        return None
    spec = item["spec"]
    kinds = {"recipe": str, "resume": str, "label": str, "overrides": list, "slots": list}
    if set(spec) - set(kinds) or not all(isinstance(spec[k], kinds[k]) for k in spec):
        return None
    if not all(isinstance(v, str) and "\x00" not in v for k in ("overrides", "slots") for v in spec.get(k, [])):
        return None
    if any("\x00" in spec.get(k, "") for k in ("recipe", "resume")) or not (spec.get("recipe") or spec.get("resume")):
        return None
    return LaunchSpec(**spec)


def read_launch_run_dir(out_path: Path, cwd: Path) -> Path | None:
    """The run directory from a launch file's first line `run directory: PATH` (None until written)."""
    try:
        with open(out_path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    for raw in head.split(b"\n")[:-1]:  # complete lines only
        line = raw.decode("utf-8", errors="replace").strip()
        if line.startswith("run directory:"):
            path = Path(line.split(":", 1)[1].strip())
            return path if path.is_absolute() else (cwd / path)
    return None


def last_error_line(out_path: Path) -> str:
    """The engine's one-line error (exit 2) or the last line of a traceback."""
    try:
        lines = [l.strip() for l in out_path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1] if lines else ""


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def reap_pid(pid: int | None) -> None:
    if not pid:
        return
    try:
        os.waitpid(int(pid), os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def is_zombie(pid) -> bool:
    """A zombie answers kill(pid, 0) although it is dead; /proc tells (Linux); elsewhere assume not."""
    if not pid:
        return False
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2:data.rfind(b")") + 3] == b"Z"
    except OSError:
        return False
