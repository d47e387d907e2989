"""`bcdcore sweep`: run a recipe's [sweep] grid as a queue of `bcdcore run` subprocesses over device slots.

A sweep directory (under the runs directory) groups its runs and records the grid in sweep.json. Each slot
is one device (a GPU id, or the CPU) times --per-gpu; a new run starts as soon as a slot frees. The first
SIGINT/SIGTERM stops the queue and sends SIGTERM to every child's process group (they checkpoint and mark
themselves killed); children still alive after a grace period get SIGKILL.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

from bcdcore.recipe import Recipe, expand_grid, os_reason
from bcdcore.rundir import run_id_for, unique_dir, write_json_atomic
from bcdcore.scheduler import (
    Scheduler,
    Slot,
    Task,
    cpu_slot,
    gpu_slot,
    point_overrides,
    read_run_directory,
    run_command,
)


@dataclass
class Point:
    index: int
    overrides: dict
    state: str = "pending"  # pending | running | done | not started
    run_dir: str | None = None
    exit_code: int | None = None
    device: str | None = None
    started: float | None = None
    ended: float | None = None


def device_slots(devices: list[str | None]) -> list[Slot]:
    """One scheduler slot per device: a GPU id, or None for the CPU (CUDA_VISIBLE_DEVICES left as it is)."""
    return [gpu_slot(d) if d is not None else cpu_slot(cuda_visible=None) for d in dict.fromkeys(devices)]


class Sweep:
    """The grid's points as tasks of one bcdcore.scheduler.Scheduler (the same queue, slots, processes and kill
    as bcdtui's runner): at most `per_device` runs per device at once, each started as a sweep point."""

    def __init__(self, recipe_path: Path, recipe: Recipe, runs_dir: Path, devices: list[str | None],
                 per_device: int, overrides: list[str] = (), grace_s: float = 60.0, poll_s: float = 0.2) -> None:
        self.recipe_path = Path(recipe_path)
        self.points = [Point(i, p) for i, p in enumerate(expand_grid(recipe.sweep))]
        self.slots = [d for d in devices for _ in range(per_device)]  # as sweep.json records them
        self.overrides = list(overrides)
        self.grace_s, self.poll_s = grace_s, poll_s
        self.stop_signal: int | None = None
        self.dir = unique_dir(Path(runs_dir), run_id_for(f"{recipe.run.name}-sweep", recipe.digest()))
        (self.dir / "logs").mkdir()
        self.scheduler = Scheduler(device_slots(devices), per_device, grace_s=grace_s)
        self.save()

    def command(self, point: Point) -> list[str]:
        return run_command(recipe=self.recipe_path, runs_dir=self.dir, sweep_point=True,
                           overrides=[*self.overrides, *point_overrides(point.overrides)])

    def log_path(self, point: Point) -> Path:
        return self.dir / "logs" / f"point-{point.index}.out"

    def save(self) -> None:
        write_json_atomic(self.dir / "sweep.json", {
            "recipe": str(self.recipe_path), "overrides": self.overrides, "slots": self.slots,
            "points": [{"index": p.index, "overrides": p.overrides, "state": p.state, "run_dir": p.run_dir,
                        "exit_code": p.exit_code, "device": p.device, "started": p.started, "ended": p.ended}
                       for p in self.points]})

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def run(self, report=print) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop(report)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _loop(self, report) -> int:
        scheduler = self.scheduler
        tasks: dict[str, Point] = {}
        for point in self.points:
            task = scheduler.submit(Task(args=self.command(point), out_path=str(self.log_path(point))))
            tasks[task.id] = point
        while (scheduler.queued() or scheduler.running()) and self.stop_signal is None:
            step = scheduler.tick()
            for task in step.started:
                point = tasks[task.id]
                point.state, point.started = "running", task.started
                point.device = scheduler.slot(task.slot).cuda_visible
                report(f"started point {point.index + 1}/{len(self.points)}: {_describe(point.overrides)}"
                       + (f" on GPU {point.device}" if point.device else ""))
            for task in step.ended:
                self._collect(tasks[task.id], task)
                report(f"point {tasks[task.id].index + 1} exited {task.exit_code}: "
                       f"{tasks[task.id].run_dir or 'no run directory'}")
            if step.started or step.ended:
                self.save()
            time.sleep(self.poll_s)
        if self.stop_signal is not None:
            running = scheduler.running()
            report(f"stopping: SIGTERM to {len(running)} running run(s)")
            for task in scheduler.stop(self.grace_s, self.poll_s):
                tasks[task.id].state = "not started"
            for task in running:
                self._collect(tasks[task.id], task)
            self.save()
            return 128 + self.stop_signal
        self.save()
        return 0 if all(p.exit_code == 0 for p in self.points) else 1

    def _collect(self, point: Point, task: Task) -> None:
        point.exit_code = task.exit_code
        point.state, point.ended = "done", task.ended or time.time()
        # a missing log leaves the point without a run directory; it still ends
        point.run_dir = read_run_directory(task.out_path)


def _describe(point: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in point.items())


def detect_gpus() -> list[str]:
    """GPU ids this process may use (CUDA_VISIBLE_DEVICES is honoured by torch's count)."""
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch CUDA runtime: a CPU machine
        return []


def sweep_summary(sweep_dir: Path) -> dict:
    """sweep.json, total: its plain fields, `points` (only well-formed ones), each with `run_state` (the label
    a reader shows for its run: running, lost, unreadable: ...); `problem` says why sweep.json itself could
    not be read (then `points` is empty). Never raises on content."""
    from bcdcore.records import RecordError, decode_object, plain
    from bcdcore.rundir import read_file_bytes, read_status_checked, run_state

    try:
        data = plain(decode_object(read_file_bytes(Path(sweep_dir) / "sweep.json", 64 << 20), "sweep.json"))
    except OSError as exc:
        return {"problem": f"sweep.json: {os_reason(exc, with_path=False)}", "points": []}
    except RecordError as exc:
        return {"problem": str(exc) if str(exc).startswith("sweep.json") else f"sweep.json {exc}", "points": []}
    points = data.get("points") if isinstance(data.get("points"), list) else []
    data["points"] = [p for p in points if isinstance(p, dict)]
    for point in data["points"]:
        run_dir = point.get("run_dir")
        if isinstance(run_dir, str) and run_dir:
            status, problem = read_status_checked(Path(run_dir))
            point["run_state"] = run_state(status, Path(run_dir), problem).label
        else:
            point["run_state"] = str(point.get("state", "pending"))
    return data
