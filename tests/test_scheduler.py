"""bcdcore.scheduler, the one queue of `bcdcore sweep` and bcdtui: no torch, one parser of the run directory
line, one command for a sweep point, unique directories, and the queue's slot limit and kill."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

from bcdcore.rundir import unique_dir
from bcdcore.scheduler import (
    CPU_SLOT,
    Scheduler,
    SchedulerError,
    Slot,
    Task,
    cpu_slot,
    gpu_slot,
    is_zombie,
    parse_run_directory,
    point_overrides,
    read_run_directory,
    run_command,
)


def test_importing_the_scheduler_imports_no_torch():
    code = "import sys, bcdcore.scheduler; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_run_directory_line():
    assert parse_run_directory("run directory: runs/a-1\nmore") == "runs/a-1"
    assert parse_run_directory(b"warning: x\nrun directory: /abs/b\n") == "/abs/b"
    assert parse_run_directory("run directory: runs/half") is None  # not complete yet
    assert parse_run_directory("") is None
    assert read_run_directory("/nonexistent/out") is None


def test_a_sweep_point_is_one_command():
    args = run_command(["bcd"], "grid.toml", runs_dir="runs", sweep_point=True,
                       overrides=["run.rounds=2", *point_overrides({"algorithm.K": 5, "algorithm.solver": "adam"})])
    assert args == ["bcd", "run", "grid.toml", "--runs-dir", "runs", "--quiet", "--sweep-point", "--set",
                    "run.rounds=2", "--set", "algorithm.K=5", "--set", 'algorithm.solver="adam"']
    assert run_command(["bcd"], resume="runs/a") == ["bcd", "run", "--resume", "runs/a", "--quiet"]


def test_unique_dir_never_reuses(tmp_path):
    first, second = unique_dir(tmp_path / "p", "x"), unique_dir(tmp_path / "p", "x")
    assert first.name == "x" and second.name == "x-2" and first.is_dir() and second.is_dir()


def test_queue_respects_the_slot_limit_and_kill_escalates(tmp_path):
    slots = [gpu_slot("0"), cpu_slot()]
    scheduler = Scheduler(slots, per_slot=1, grace_s=0.2, env={**os.environ, "PYTHONPATH": str(REPO)})
    sleeper = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                     "print('run directory: r', flush=True); time.sleep(60)"]
    tasks = [scheduler.submit(Task(args=sleeper, out_path=str(tmp_path / f"{i}.out"))) for i in range(3)]
    with pytest.raises(SchedulerError):
        scheduler.submit(Task(args=sleeper, slots=["gpu9"]))
    step = scheduler.tick()
    assert {t.slot for t in step.started} == {"gpu0", CPU_SLOT} and tasks[2].state == "queued"
    assert scheduler.usage(["gpu0"]) == {"gpu0": 2, CPU_SLOT: 1}
    deadline = time.monotonic() + 30
    while read_run_directory(tasks[0].out_path) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert read_run_directory(tasks[0].out_path) == "r"
    env_of_gpu = scheduler.environment(slots[0])
    assert env_of_gpu["CUDA_VISIBLE_DEVICES"] == "0"
    assert scheduler.environment(Slot(CPU_SLOT, "cpu", None)).get("CUDA_VISIBLE_DEVICES") == \
        os.environ.get("CUDA_VISIBLE_DEVICES")
    never = scheduler.stop(grace_s=0.3, poll_s=0.05)  # SIGTERM is ignored: SIGKILL after the grace period
    assert never == [tasks[2]] and tasks[2].state == "not started"
    assert all(t.state == "exited" and t.exit_code == -9 for t in tasks[:2])
    assert not any(is_zombie(t.pid) for t in tasks[:2])
    assert any("SIGKILL" in m for m in scheduler.drain_messages())
