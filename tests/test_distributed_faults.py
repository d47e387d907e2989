"""Distributed runs that stop early: a 2-process gloo run on the CPU stopped by SIGTERM and continued with
`--resume` reproduces every round of the uninterrupted run, communication totals included; a rank that raises
(mid-run, or while it sets up) fails the run naming that rank and its one-line error, without leaving the
other rank hanging.

The fault comes from outside the product: a third-party measurement unit (loaded by dotted path, see
`bcdcore.measure.load_unit`) written into tmp_path, whose constructor, in the process whose torchrun RANK is
1, either raises or installs a global torch forward hook that raises a few rounds in. Rank 0 never calls the
unit (`every` is beyond the run), so only rank 1 misbehaves.
"""
from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_env, dist_recipe, run_cli, start_cli, wait_for

from bcdcore.rundir import read_events, read_status

DIST = dist_recipe("dfault", timeout_s=300)
# Enough rounds (1 to 2 s of training) that SIGTERM sent at the first metric event lands long before the end.
ROUNDS, EVERY = 120, 20
RESUMABLE = DIST.replace("rounds = 3", f"rounds = {ROUNDS}").replace("every = 1", f"every = {EVERY}")
# Runs until a rank fails; the recipe's timeout_s (300 s, also the agent's grace before SIGKILL) is far above
# FAIL_WITHIN, so a rank left waiting in a collective would show as a timeout, not pass.
FOREVER = DIST.replace("rounds = 3", "rounds = 100000").replace("every = 1", "every = 0")
FAIL_WITHIN = 30.0

PLUGIN = '''
import os

import torch


class RaiseInForward:
    """On rank 1: a forward pass raises after a few rounds (a model fault on one rank only)."""
    name = "raise_in_forward"
    calls = 0

    def __init__(self):
        if os.environ.get("RANK") == "1":
            torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module, args, output):
        type(self).calls += 1
        if type(self).calls > 200:  # module calls: the flop count at the start (6 forwards), then a few rounds
            raise RuntimeError("injected fault on rank 1\\nsecond line of the message")

    def measure(self, ctx):
        return {"value": 0}


class RaiseAtSetup:
    """On rank 1: the unit cannot be created (the run directory exists, rank 0 is already training)."""
    name = "raise_at_setup"

    def __init__(self):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("cannot set up on rank 1\\nsecond line of the message")

    def measure(self, ctx):
        return {"value": 0}
'''


def _run_dir(cwd: Path, stdout_line: str) -> Path:
    assert stdout_line.startswith("run directory: "), stdout_line
    return cwd / stdout_line.strip().removeprefix("run directory: ")


def _rank_pids(run_dir: Path) -> dict[int, int]:
    pids = {}
    for rank in (0, 1):
        try:
            pids[rank] = int((run_dir / f"rank{rank}.pid").read_text())
        except (OSError, ValueError):
            pass
    return pids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _strip(event: dict, *keys: str) -> dict:
    return {k: v for k, v in event.items() if k not in ("t", *keys)}


# ----------------------------------------------------------------------------------------------------------
# resume

@pytest.mark.parametrize("mode", ["blockwise", "entire"])
def test_sigterm_then_resume_equals_the_uninterrupted_run(tmp_path, mode):
    """blockwise: the blocks' solver states and streams come from their owners; entire (DDP): every rank's
    own minibatch stream comes back to that rank."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RESUMABLE.replace('mode = "blockwise"', f'mode = "{mode}"'))
    with ThreadPoolExecutor(1) as pool:
        # the reference runs beside the interrupted run, so that their start-ups (torch imports) overlap
        whole = pool.submit(run_cli, "run", recipe, "--runs-dir", "whole", "--quiet", cwd=tmp_path, timeout=240)
        proc = start_cli("run", recipe, "--runs-dir", "cut", "--quiet", cwd=tmp_path)
        try:
            run_dir = _run_dir(tmp_path, proc.stdout.readline())
            wait_for(lambda: proc.poll() is not None or read_events(run_dir, "metric"), 120,
                      "the first metric event")
            assert proc.poll() is None, f"the run ended before SIGTERM: {proc.communicate()}"
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        whole = whole.result()
    assert whole.returncode == 0, whole.stderr
    reference = _run_dir(tmp_path, whole.stdout.splitlines()[0])

    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    status = read_status(run_dir)
    assert status["state"] == "killed" and status["exit_code"] == 128 + signal.SIGTERM
    killed_at = read_events(run_dir, "metric")[-1]["round"]
    assert status["progress"]["round"] == killed_at < ROUNDS
    end = read_events(run_dir, "end")
    assert [(e["state"], e["reason"]) for e in end] == [("killed", "killed by SIGTERM")]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["round"] == killed_at

    resumed = run_cli("run", "--resume", run_dir, "--quiet", cwd=tmp_path, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert _run_dir(tmp_path, resumed.stdout.splitlines()[0]).resolve() == run_dir.resolve()
    assert resumed.stdout.splitlines()[-1] == whole.stdout.splitlines()[-1]  # same final metrics line
    status = read_status(run_dir)
    assert status["state"] == "finished" and status["exit_code"] == 0 and status["world_size"] == 2
    assert status["progress"] == {"round": ROUNDS, "rounds": ROUNDS}
    assert [e["state"] for e in read_events(run_dir, "end")] == ["killed", "finished"]
    starts = read_events(run_dir, "start")
    assert [s["resumed_from_round"] for s in starts] == [None, killed_at]
    assert starts[1].get("block_owner") == starts[0].get("block_owner")

    # Every round, before and after the cut, equals the uninterrupted run's: losses, evaluations, compute
    # and the running communication totals (bytes_comm, comm_sim_s); only clock readings may differ.
    clock = ("wall_s", "sim_time_s")
    cut_metrics, whole_metrics = read_events(run_dir, "metric"), read_events(reference, "metric")
    assert [m["round"] for m in cut_metrics] == list(range(1, ROUNDS + 1))  # no round lost or repeated
    assert [_strip(m, *clock) for m in cut_metrics] == [_strip(m, *clock) for m in whole_metrics]
    assert sum("val_loss" in m for m in cut_metrics) == ROUNDS // EVERY
    blocks = read_events(run_dir, "block")
    assert [_strip(b) for b in blocks] == [_strip(b) for b in read_events(reference, "block")]
    assert bool(blocks) == (mode == "blockwise")
    a = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    b = torch.load(reference / "checkpoint.pt", weights_only=False)
    assert torch.equal(a["flat"], b["flat"])
    assert all(torch.equal(x, y) for x, y in zip(a["trainer"]["solver"]["state"], b["trainer"]["solver"]["state"]))
    assert a["comm"] == b["comm"] and a["comm"]["bytes_total"] == whole_metrics[-1]["bytes_comm"]
    assert len(np.load(run_dir / "arrays" / "train_loss.npy")) == ROUNDS


# ----------------------------------------------------------------------------------------------------------
# a rank that raises

def _run_with_fault(tmp_path: Path, unit: str):
    """Run FOREVER with the plugin unit; returns (process, stdout, stderr, seconds from rank 1's error to the
    CLI's exit, run directory, rank1.error's contents)."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "bcd_fault_unit.py").write_text(PLUGIN)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(FOREVER + f'\n[[measure]]\nunit = "bcd_fault_unit.{unit}"\nevery = 1000000\n')
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(plugins), env["PYTHONPATH"]])
    proc = start_cli("run", recipe, "--runs-dir", "runs", "--quiet", cwd=tmp_path, env=env)
    try:
        out, err = proc.communicate(timeout=FAIL_WITHIN + 90)  # start-up on a busy machine, then the fault
        ended = time.time()
    finally:
        if proc.poll() is None:  # a hang: end the launcher and the ranks it started, by their pids
            proc.kill()
            for run_dir in (tmp_path / "runs").glob("*"):
                for pid in _rank_pids(run_dir).values():
                    if not _gone(pid):
                        os.kill(pid, signal.SIGKILL)
    run_dir = _run_dir(tmp_path, out.splitlines()[0])
    assert (run_dir / "rank1.error").is_file(), out + err
    error = json.loads((run_dir / "rank1.error").read_text())
    return proc, out, err, ended - error["t"], run_dir, error


def _assert_failed_naming_rank_1(proc, out: str, err: str, after_error: float, run_dir: Path, error: dict,
                                 message: str) -> None:
    line = f"rank 1 raised: error: RuntimeError: {message}"
    assert proc.returncode == 1, err
    assert after_error < FAIL_WITHIN  # nobody waited for the collective timeout or the agent's SIGKILL
    assert out.splitlines()[-1] == f"failed: {line}"
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["exit_code"] == 1
    assert status["error"] == line  # the first line of the message only
    end = read_events(run_dir, "end")
    assert len(end) == 1 and end[0]["state"] == "failed" and end[0]["reason"] == line
    assert error["error"] == f"error: RuntimeError: {message}"
    log = (run_dir / "rank1.log").read_text()  # the whole traceback stays in the rank's log
    assert "Traceback" in log and "second line of the message" in log
    for rank, pid in _rank_pids(run_dir).items():  # the agent ended both ranks: none hangs in a collective
        wait_for(lambda: _gone(pid), 10, f"rank {rank} (pid {pid}) to be gone")


def test_rank_raising_mid_run_fails_the_run_naming_it(tmp_path):
    proc, out, err, after_error, run_dir, error = _run_with_fault(tmp_path, "RaiseInForward")
    _assert_failed_naming_rank_1(proc, out, err, after_error, run_dir, error, "injected fault on rank 1")
    assert read_events(run_dir, "metric")  # it failed mid-run, after rounds were recorded
    assert set(_rank_pids(run_dir)) == {0, 1}  # both ranks were training, and both are gone (checked above)


def test_rank_raising_while_setting_up_fails_the_run_naming_it(tmp_path):
    """Rank 1 raises before its training loop while rank 0 waits in the first collective: rank 0's error
    ("Connection closed by peer") comes second, and the run names rank 1."""
    proc, out, err, after_error, run_dir, error = _run_with_fault(tmp_path, "RaiseAtSetup")
    _assert_failed_naming_rank_1(proc, out, err, after_error, run_dir, error, "cannot set up on rank 1")
    assert not read_events(run_dir, "metric")


@pytest.mark.parametrize("recorded", ["finished", "killed", "running"])
def test_a_rank_dying_after_the_recorded_end_leaves_the_end_as_it_is(tmp_path, recorded):
    """A rank aborting in its teardown (SIGABRT from the process group's C++ threads, seen about once in 40
    two-rank runs) after rank 0 recorded the run's end must not turn a finished run into a failed one; a rank
    dying before any end was recorded still fails the run, naming it."""
    from types import SimpleNamespace

    from bcdcore.run.distributed import finish_failed
    from bcdtui.synthetic import write_run

    run_dir = write_run(tmp_path, "r-20261202-150000-abcdef", state=recorded, rounds=4)
    failures = {1: SimpleNamespace(exitcode=-signal.SIGABRT, pid=4242, timestamp=time.time())}
    code, summary = finish_failed(run_dir, failures)
    ends = read_events(run_dir, "end")
    if recorded == "running":  # rank 0 never recorded an end: the rank's death is the run's failure
        assert (code, summary) == (1, "failed: rank 1 died (SIGABRT, pid 4242)")
        assert read_status(run_dir)["state"] == "failed" and ends[-1]["state"] == "failed"
        return
    assert read_status(run_dir)["state"] == recorded and [e["state"] for e in ends] == [recorded]
    assert code == (0 if recorded == "finished" else read_status(run_dir)["exit_code"] or 1)
    assert summary.startswith(f"{recorded}: ")
    assert (f"note: rank 1 died (SIGABRT, pid 4242) after the run had ended ({recorded})"
            in (run_dir / "log.txt").read_text())
