"""`bcdcore sweep`: run a recipe's [sweep] grid as a queue of `bcdcore run` subprocesses over device slots.

A sweep directory (under the runs directory) groups its runs and records the grid in sweep.json. Each slot
is one device (a GPU id, or the CPU) times --per-gpu; a new run starts as soon as a slot frees. The first
SIGINT/SIGTERM stops the queue and sends SIGTERM to every child's process group (they checkpoint and mark
themselves killed); children still alive after a grace period get SIGKILL.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bcdcore.recipe import Recipe, os_reason, toml_value, expand_grid
from bcdcore.rundir import run_id_for, write_json_atomic


@dataclass
class Point:
    index: int
    overrides: dict
    state: str = "pending"  # pending | running | done | not started
    run_dir: str | None = None
    exit_code: int | None = None
    device: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    started: float | None = None
    ended: float | None = None


class Sweep:
    def __init__(self, recipe_path: Path, recipe: Recipe, runs_dir: Path, devices: list[str | None],
                 per_device: int, overrides: list[str] = (), grace_s: float = 60.0, poll_s: float = 0.2) -> None:
        self.recipe_path = Path(recipe_path)
        self.points = [Point(i, p) for i, p in enumerate(expand_grid(recipe.sweep))]
        self.slots = [d for d in devices for _ in range(per_device)]
        self.overrides = list(overrides)
        self.grace_s, self.poll_s = grace_s, poll_s
        self.stop_signal: int | None = None
        runs_dir = Path(runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        base = run_id_for(f"{recipe.run.name}-sweep", recipe.digest())
        for n in range(1, 1000):
            self.dir = runs_dir / (base if n == 1 else f"{base}-{n}")
            try:
                self.dir.mkdir()
                break
            except FileExistsError:
                continue
        (self.dir / "logs").mkdir()
        self.save()

    def command(self, point: Point) -> list[str]:
        sets = [f"{k}={toml_value(v)}" for k, v in point.overrides.items()]
        args = [sys.executable, "-m", "bcdcore", "run", str(self.recipe_path), "--runs-dir", str(self.dir),
                "--quiet", "--sweep-point"]
        for item in [*self.overrides, *sets]:
            args += ["--set", item]
        return args

    def start(self, point: Point, device: str | None) -> None:
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        out = open(self.dir / "logs" / f"point-{point.index}.out", "w")
        point.process = subprocess.Popen(self.command(point), stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, stdin=subprocess.DEVNULL)
        out.close()
        point.state, point.device, point.started = "running", device, time.time()

    def _collect(self, point: Point) -> None:
        point.exit_code = point.process.returncode
        point.state, point.ended = "done", time.time()
        try:
            log = (self.dir / "logs" / f"point-{point.index}.out").read_text(errors="replace")
        except OSError:
            log = ""  # the point's log went missing: the point still ends, without a run directory
        for line in log.splitlines():
            if line.startswith("run directory: "):
                point.run_dir = line.removeprefix("run directory: ").strip()
                break

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
        pending = list(self.points)
        free = list(self.slots)
        running: list[tuple[Point, str | None]] = []
        while (pending or running) and self.stop_signal is None:
            while pending and free:
                point, device = pending.pop(0), free.pop(0)
                self.start(point, device)
                running.append((point, device))
                report(f"started point {point.index + 1}/{len(self.points)}: {_describe(point.overrides)}"
                       + (f" on GPU {device}" if device else ""))
                self.save()
            for point, device in list(running):
                if point.process.poll() is not None:
                    self._collect(point)
                    running.remove((point, device))
                    free.append(device)
                    report(f"point {point.index + 1} exited {point.exit_code}: {point.run_dir or 'no run directory'}")
                    self.save()
            time.sleep(self.poll_s)
        if self.stop_signal is not None:
            self._terminate([p for p, _ in running], report)
            for point in pending:
                point.state = "not started"
            self.save()
            return 128 + self.stop_signal
        self.save()
        return 0 if all(p.exit_code == 0 for p in self.points) else 1

    def _terminate(self, points: list[Point], report) -> None:
        report(f"stopping: SIGTERM to {len(points)} running run(s)")
        for point in points:
            _signal_group(point.process, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and any(p.process.poll() is None for p in points):
            time.sleep(self.poll_s)
        for point in points:
            if point.process.poll() is None:
                _signal_group(point.process, signal.SIGKILL)
                point.process.wait()
            self._collect(point)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


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
