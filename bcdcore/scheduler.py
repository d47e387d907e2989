"""One subprocess scheduler: slots, a FIFO queue with a per-slot limit, detached `bcdcore run` processes, kill.

`bcdcore sweep` and bcdtui's runner both run their processes through it. It imports no torch (the TUI must
start instantly and never load training code) and reads of a run only the line `run directory: PATH`.
Processes are detached: each leads its own session (a closed terminal does not reach it; a kill reaches its
whole group), starts from an argument list (never a shell string), and writes stdout and stderr to a file, never
a pipe (a pipe nobody reads would block the engine). A slot sets CUDA_VISIBLE_DEVICES for what it holds.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from bcdcore.recipe import toml_value
from bcdcore.rundir import pid_alive

CPU_SLOT = "cpu"
RUN_DIRECTORY = "run directory:"  # the first line `bcdcore run` prints: `run directory: PATH`


# ----------------------------------------------------------------------------------------------------------
# slots

@dataclass(frozen=True)
class Slot:
    """Where a process goes: one GPU (CUDA_VISIBLE_DEVICES=<index>) or the CPU."""

    key: str  # "gpu0", "gpu1", ... or "cpu"
    label: str  # "0: NVIDIA H100 (80 GiB)" or "CPU (2 cores)"
    cuda_visible: str | None  # CUDA_VISIBLE_DEVICES for processes here; None leaves the inherited value

    @property
    def is_gpu(self) -> bool:
        return self.key != CPU_SLOT


def gpu_slot(index: str, label: str = "") -> Slot:
    return Slot(f"gpu{index}", label or f"GPU {index}", str(index))


def cpu_slot(cuda_visible: str | None = "") -> Slot:
    """The CPU slot. bcdtui hides the GPUs from it (""); `bcdcore sweep` on a machine without them passes None,
    which leaves CUDA_VISIBLE_DEVICES as the user set it."""
    return Slot(CPU_SLOT, f"CPU ({os.cpu_count() or 1} cores)", cuda_visible)


def slot_key_for_gpu(gpu: str | None) -> str:
    """The slot a run occupies, from status.json's `gpu` (its CUDA_VISIBLE_DEVICES; empty on the CPU)."""
    gpu = (gpu or "").strip()
    return f"gpu{gpu.split(',')[0]}" if gpu else CPU_SLOT


# ----------------------------------------------------------------------------------------------------------
# the one way to start `bcdcore run`, and to read what it printed

def point_overrides(point: dict[str, Any]) -> list[str]:
    """A sweep grid point ({"algorithm.K": 5, ...}) as `--set` items."""
    return [f"{key}={toml_value(value)}" for key, value in point.items()]


def run_command(engine: list[str] | None = None, recipe: str | Path | None = None, *,
                runs_dir: str | Path | None = None, overrides: Iterable[str] = (), resume: str | Path | None = None,
                sweep_point: bool = False, quiet: bool = True) -> list[str]:
    """The argument list of one `bcdcore run`: a recipe (with `--set` overrides), or `--resume RUN_DIR`.
    A sweep point is its sweep's recipe with `--sweep-point` (the engine then drops the [sweep] table) and the
    point's values as overrides: `bcdcore sweep` and bcdtui both start points this way."""
    args = [*(engine or [sys.executable, "-m", "bcdcore"]), "run"]
    if resume:
        args += ["--resume", str(resume)]
    else:
        args.append(str(recipe))
        if runs_dir is not None:
            args += ["--runs-dir", str(runs_dir)]
    if quiet:
        args.append("--quiet")
    if sweep_point and not resume:
        args.append("--sweep-point")
    for item in overrides:
        args += ["--set", item]
    return args


def parse_run_directory(data: bytes | str) -> str | None:
    """The PATH of the first complete `run directory: PATH` line in what a `bcdcore run` printed (None until
    that line is complete), as printed: relative paths are relative to the process's working directory."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    for line in text.split("\n")[:-1]:  # complete lines only: the last piece may still be being written
        line = line.strip()
        if line.startswith(RUN_DIRECTORY):
            return line[len(RUN_DIRECTORY):].strip() or None
    return None


def read_run_directory(out_path: Path | str, limit: int = 64 << 10) -> str | None:
    """parse_run_directory over the head of an output file (warnings may precede the line: a generous head)."""
    try:
        with open(out_path, "rb") as f:
            return parse_run_directory(f.read(limit))
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------------
# processes

def spawn(args: list[str], out_path: Path | str, *, env: dict[str, str] | None = None,
          cwd: Path | str | None = None) -> subprocess.Popen:
    """Start `args` detached: its own session, no stdin, stdout and stderr into `out_path`."""
    with open(out_path, "wb") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)


def signal_process(pid: int, sig: int, group: bool) -> None:
    """`sig` to the process group led by `pid` (group) or to `pid` alone; a process already gone is fine."""
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def reap_pid(pid: int | None) -> None:
    """Collect `pid` if it is an exited child of this process (else nothing)."""
    if not pid:
        return
    try:
        os.waitpid(int(pid), os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def is_zombie(pid: Any) -> bool:
    """An exited process nobody has reaped: it still answers kill(pid, 0), but rundir.pid_alive (the one
    /proc state check) says it is not alive."""
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2 ** 31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # another user's process: it exists
    return not pid_alive(pid)


# ----------------------------------------------------------------------------------------------------------
# the queue

@dataclass
class Task:
    """One process through the queue. States: queued -> running -> exited; `error` when it could not start."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    args: list[str] = field(default_factory=list)
    out_path: str = ""  # where its stdout and stderr go
    slots: list[str] = field(default_factory=list)  # slot keys it may take; empty = any
    state: str = "queued"
    slot: str = ""
    pid: int | None = None
    exit_code: int | None = None
    error: str = ""
    started: float = 0.0  # unix time
    ended: float = 0.0
    proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    RUNNING = "running"  # the state a started task takes (a subclass may name its own)

    @property
    def alive(self) -> bool:  # started and not yet seen to exit
        return self.state == self.RUNNING


@dataclass
class Step:
    """What one `Scheduler.tick()` did."""
    started: list[Task] = field(default_factory=list)
    ended: list[Task] = field(default_factory=list)  # exited, or could not start
    kills: bool = False  # a killed process went, or got SIGKILL

    @property
    def changed(self) -> bool:
        return bool(self.started or self.ended or self.kills)


@dataclass
class KillRequest:
    pid: int
    group: bool  # signal the process group (the process is its session leader) or the pid alone
    deadline: float  # clock time after which SIGKILL follows
    label: str = ""  # what the user calls it (a run directory's name)
    escalated: bool = False


class SchedulerError(Exception):
    """A refused request (an unknown slot, nothing to kill...), phrased for the user."""


class Scheduler:
    """Slots x `per_slot` processes at once, FIFO. Call `tick()` periodically: it reaps exited processes,
    sends SIGKILL to those that outlived their kill grace period, and starts queued tasks where there is room
    (each on the least busy slot it may use)."""

    def __init__(self, slots: list[Slot], per_slot: int = 1, *, cwd: Path | str | None = None,
                 env: dict[str, str] | None = None, grace_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = list(slots)
        self.per_slot = max(1, int(per_slot))
        self.cwd = cwd
        self.env = env  # None: this process's environment at each start
        self.grace_s = grace_s
        self.clock = clock
        self.tasks: dict[str, Task] = {}  # in submission order
        self.kills: dict[int, KillRequest] = {}
        self.messages: list[str] = []  # things the user should be told

    def slot(self, key: str) -> Slot | None:
        return next((s for s in self.slots if s.key == key), None)

    # --- queue
    def submit(self, task: Task) -> Task:
        unknown = [s for s in task.slots if self.slot(s) is None]
        if unknown:
            raise SchedulerError(f"unknown slot(s) {', '.join(unknown)}; this machine has "
                                 f"{', '.join(s.key for s in self.slots)}")
        self.tasks[task.id] = task
        return task

    def cancel(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None or task.state != "queued":
            raise SchedulerError("only a queued launch can be cancelled; kill a started run instead")
        return self.tasks.pop(task_id)

    def queued(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.state == "queued"]

    def running(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.alive]

    # --- capacity
    def usage(self, others: Iterable[str] = ()) -> dict[str, int]:
        """Processes per slot key: this scheduler's running tasks plus `others` (slot keys of processes it did
        not start, e.g. runs a restarted TUI re-attached to)."""
        counts = {s.key: 0 for s in self.slots}
        for key in [t.slot for t in self.running()] + list(others):
            if key in counts:
                counts[key] += 1
        return counts

    def free_slot(self, task: Task, counts: dict[str, int]) -> Slot | None:
        allowed = [s for s in self.slots if not task.slots or s.key in task.slots]
        free = [s for s in allowed if counts.get(s.key, 0) < self.per_slot]
        return min(free, key=lambda s: counts.get(s.key, 0)) if free else None

    # --- the periodic step
    def tick(self, others: Iterable[str] = ()) -> Step:
        """Reap, escalate kills, start what fits (`others`: as in `usage`)."""
        step = Step(ended=[t for t in self.running() if self.poll(t)])
        step.kills = self.escalate_kills()
        queued = self.queued()
        if queued:
            counts = self.usage(others)
            for task in queued:
                slot = self.free_slot(task, counts)
                if slot is None:
                    continue
                self.start(task, slot)
                if task.alive:
                    counts[slot.key] += 1
                    step.started.append(task)
                else:
                    step.ended.append(task)
        return step

    def environment(self, slot: Slot) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        if slot.cuda_visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.cuda_visible
        env["PYTHONUNBUFFERED"] = "1"  # the run directory line must reach the file at once
        if not slot.is_gpu and "OMP_NUM_THREADS" not in env:  # runs sharing the CPU share its cores
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.per_slot))
        return env

    def start(self, task: Task, slot: Slot) -> None:
        task.slot, task.started = slot.key, time.time()
        try:
            Path(task.out_path).parent.mkdir(parents=True, exist_ok=True)
            task.proc = spawn(task.args, task.out_path, env=self.environment(slot), cwd=self.cwd)
        except OSError as exc:
            task.state, task.error, task.ended = "error", f"could not start {task.args[0]}: {exc}", time.time()
            self.messages.append(task.error)
            return
        task.pid, task.state = task.proc.pid, task.RUNNING

    def poll(self, task: Task) -> bool:
        """True when the running `task` has just exited (its exit code recorded)."""
        if not task.alive:
            return False
        code = task.proc.poll() if task.proc is not None else (None if pid_alive(task.pid) else -1)
        if code is None:
            return False
        task.exit_code, task.state, task.ended = code, "exited", time.time()
        self.kills.pop(task.pid or -1, None)
        return True

    # --- kill
    def kill(self, pid: int, *, grace_s: float | None = None, label: str = "") -> KillRequest:
        """SIGTERM to `pid`'s process group (or to `pid` when it leads none); SIGKILL follows at the first tick
        after the grace period. `pid` need not be this scheduler's (a re-attached run)."""
        if not pid_alive(pid):
            raise SchedulerError("that run is not running here: nothing to kill")
        try:
            group = os.getpgid(pid) == pid
        except ProcessLookupError:
            raise SchedulerError("that run has just ended: nothing to kill") from None
        request = KillRequest(pid=pid, group=group, label=label,
                              deadline=self.clock() + (self.grace_s if grace_s is None else grace_s))
        signal_process(pid, signal.SIGTERM, group)
        self.kills[pid] = request
        return request

    def escalate_kills(self) -> bool:
        """SIGKILL to killed processes past their deadline; forgets those that are gone. True when any changed."""
        changed = False
        own = {t.pid for t in self.running()}
        for pid, request in list(self.kills.items()):
            if pid not in own:
                reap_pid(pid)  # a child of an earlier scheduler in this process; our own, poll() collects
            if not pid_alive(pid):
                del self.kills[pid]
                changed = True
            elif not request.escalated and self.clock() >= request.deadline:
                signal_process(pid, signal.SIGKILL, request.group)
                request.escalated = True
                self.messages.append(f"{request.label or pid}: still alive after the grace period; "
                                     "sent SIGKILL (the run will show as lost)")
                changed = True
        return changed

    def stop(self, grace_s: float | None = None, poll_s: float = 0.2) -> list[Task]:
        """Blocking: drop the queue, SIGTERM every running task, SIGKILL those alive after `grace_s`, and wait
        until all have exited. Returns the tasks that never started (they stay in `tasks` as "not started")."""
        never = self.queued()
        for task in never:
            task.state = "not started"
        for task in self.running():
            try:
                self.kill(task.pid or 0, grace_s=grace_s)
            except SchedulerError:
                pass  # it has just exited: the next tick collects it
        while self.running():
            self.tick()
            time.sleep(poll_s)
        return never

    def drain_messages(self) -> list[str]:
        out, self.messages = self.messages, []  # the caller shows them once
        return out
