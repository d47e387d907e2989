"""Distributed runs (`[distributed] nproc > 1`): 2-process gloo runs on the CPU started by `bcdcore run` itself
(torchrun's agent in-process). The 2-process Jacobi run equals the 1-process run bit for bit; a rank killed
mid-run ends the run as failed naming the rank; SIGTERM stops the group with a checkpoint; `entire` runs under
DistributedDataParallel. NCCL paths are not exercised here (no GPU in CI).
"""
from __future__ import annotations

import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import dist_recipe, run_cli, start_cli, wait_for

from bcdcore.recipe import RecipeError, load_recipe
from bcdcore.run.collective import balance_blocks
from bcdcore.run.distributed import assign_blocks
from bcdcore.rundir import read_events, read_status

DIST = dist_recipe("dist", timeout_s=30)
LONG = DIST.replace("rounds = 3", "rounds = 100000").replace("every = 1", "every = 0")


def _run_dir(proc_stdout: str) -> Path:
    first = proc_stdout.splitlines()[0]
    assert first.startswith("run directory: "), proc_stdout
    return Path(first.removeprefix("run directory: "))


def _write(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_blocks_balanced_by_parameter_count():
    assert assign_blocks([1040, 272, 272, 170], 2) == [0, 1, 1, 1]
    assert assign_blocks([10, 10, 10, 10], 2) == [0, 1, 0, 1]
    assert assign_blocks([5, 1], 3) == [0, 1]  # more ranks than blocks: some ranks idle
    owner = assign_blocks([7, 3, 9, 1, 4, 4], 3)
    loads = [sum(s for s, o in zip([7, 3, 9, 1, 4, 4], owner) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= 2


def test_recipe_keys_and_errors(tmp_path):
    r = load_recipe(_write(tmp_path, DIST))
    assert (r.distributed.nproc, r.distributed.communication_delay, r.distributed.bandwidth) == (2, 0.001, 1e8)
    with pytest.raises(RecipeError, match="distributed.nproc.*jacobi"):
        load_recipe(_write(tmp_path, DIST.replace('schedule = "jacobi"', 'schedule = "gauss_seidel"')))
    with pytest.raises(RecipeError, match="distributed.bandwidth"):
        load_recipe(_write(tmp_path, DIST.replace("bandwidth = 1e8", "bandwidth = -1.0")))
    with pytest.raises(RecipeError, match="distributed.backend"):
        load_recipe(_write(tmp_path, DIST.replace("timeout_s = 30", 'timeout_s = 30\nbackend = "nccl"')))


def test_two_processes_equal_one_process(tmp_path):
    """Same recipe and seed: the 2-process gloo run's final parameters, block reports and train_loss equal
    the 1-process Jacobi run's; bytes and simulated time are accounted."""
    recipe = _write(tmp_path, DIST)
    with ThreadPoolExecutor(2) as pool:
        two = pool.submit(run_cli, "run", recipe, "--runs-dir", "two", "--quiet", cwd=tmp_path, timeout=120)
        one = pool.submit(run_cli, "run", recipe, "--runs-dir", "one", "--quiet", "--set", "distributed.nproc=1",
                          cwd=tmp_path, timeout=120)
        two, one = two.result(), one.result()
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    d1, d2 = tmp_path / _run_dir(one.stdout), tmp_path / _run_dir(two.stdout)
    assert two.stdout.splitlines()[-1] == one.stdout.splitlines()[-1]  # same final metrics line
    c1 = torch.load(d1 / "checkpoint.pt", weights_only=False)
    c2 = torch.load(d2 / "checkpoint.pt", weights_only=False)
    assert torch.equal(c1["flat"], c2["flat"])
    for a, b in zip(c1["trainer"]["solver"]["state"], c2["trainer"]["solver"]["state"]):
        assert torch.equal(a, b)
    for a, b in zip(c1["trainer"]["streams"], c2["trainer"]["streams"]):
        assert a["position"] == b["position"] and torch.equal(a["order"], b["order"])

    def strip(e):
        return {k: v for k, v in e.items() if k not in ("t", "wall_s", "bytes_comm", "bytes_round", "comm_sim_s",
                                                         "sim_time_s")}

    assert [strip(e) for e in read_events(d1, "block")] == [strip(e) for e in read_events(d2, "block")]
    m1, m2 = read_events(d1, "metric"), read_events(d2, "metric")
    assert [strip(e) for e in m1] == [strip(e) for e in m2]  # train_loss, val, test, grad_evals, samples
    assert all(e["bytes_comm"] == 0 and "sim_time_s" not in e for e in m1)
    # 2 of 4 blocks active per round; every active block's parameters cross the wire once (W - 1 = 1)
    sizes = read_events(d2, "start")[0]["block_sizes"]
    blocks_by_round = {}
    for e in read_events(d2, "block"):
        blocks_by_round.setdefault(e["round"], []).append(e["block"])
    total = 0
    for e in m2:
        expected = 4 * sum(sizes[i] for i in blocks_by_round[e["round"]])
        assert e["bytes_round"] == expected
        total += expected
        assert e["bytes_comm"] == total
        assert math.isclose(e["sim_time_s"], e["wall_s"] + e["comm_sim_s"])
    # one message per round (the round's single collective): latency 1 ms + the bytes the busiest rank
    # receives / 1e8, that rank being the one that owns the fewest active bytes
    start = read_events(d2, "start")[0]
    owner = start["block_owner"]
    expected_sim = 0.0
    for blocks in blocks_by_round.values():
        mine = [4 * sum(sizes[i] for i in blocks if owner[i] == r) for r in range(2)]
        expected_sim += 0.001 + (sum(mine) - min(mine)) / 1e8
    assert m2[-1]["comm_sim_s"] == pytest.approx(expected_sim, rel=1e-9)
    status = read_status(d2)
    assert status["world_size"] == 2 and status["state"] == "finished"
    assert (d2 / "rank1.log").is_file() and (d2 / "rank1.pid").is_file()
    # blocks owned by FLOP cost (forward + the block's backward), rank 0 the lightest share
    table = start["flop_table"]
    assert owner == balance_blocks([table["forward"] + b for b in table["backward"]], 2)


def _start_long(tmp_path: Path, *extra: str):
    recipe = _write(tmp_path, LONG)
    proc = start_cli("run", recipe, "--runs-dir", "runs", "--quiet", *extra, cwd=tmp_path)
    first = proc.stdout.readline()
    assert first.startswith("run directory: "), first + proc.stderr.read()
    run_dir = tmp_path / first.strip().removeprefix("run directory: ")
    wait_for(lambda: (run_dir / "rank1.pid").is_file() and read_events(run_dir, "metric"), 60,
              "the ranks to start")
    return proc, run_dir


def test_killed_rank_fails_the_run_naming_it(tmp_path):
    proc, run_dir = _start_long(tmp_path)
    try:
        pid = int((run_dir / "rank1.pid").read_text())
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert elapsed < 60
    assert "rank 1 died (SIGKILL" in out.splitlines()[-1]
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["error"].startswith("rank 1 died (SIGKILL")
    end = read_events(run_dir, "end")
    assert len(end) == 1 and end[0]["state"] == "failed" and "rank 1" in end[0]["reason"]


def test_sigterm_stops_every_rank_with_a_checkpoint(tmp_path):
    proc, run_dir = _start_long(tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    status = read_status(run_dir)
    assert status["state"] == "killed" and status["exit_code"] == 143
    assert read_events(run_dir, "end")[-1]["reason"] == "killed by SIGTERM"
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert state["round"] == read_events(run_dir, "metric")[-1]["round"]


def test_entire_mode_runs_data_parallel(tmp_path):
    recipe = _write(tmp_path, DIST.replace('mode = "blockwise"', 'mode = "entire"'))
    proc = run_cli("run", recipe, "--runs-dir", "runs", "--quiet", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / _run_dir(proc.stdout)
    n = sum(read_events(run_dir, "start")[0]["block_sizes"])
    metrics = read_events(run_dir, "metric")
    # K = 2 full passes x 2 ranks per round, plus the evaluation's forward passes (eval.every = 1)
    table = read_events(run_dir, "start")[0]["flop_table"]
    full = table["forward"] + table["full_backward"]
    n_val = metrics[0]["flops"] - 4 * full
    assert n_val > 0
    assert [m["flops"] for m in metrics[:2]] == pytest.approx([4 * full + n_val, 8 * full + 2 * n_val])
    assert [round(m["grad_evals"] - m["flops"] / full, 9) for m in metrics] == [0.0] * 3
    assert [m["samples"] for m in metrics] == [128, 256, 384]
    # ring all-reduce of the fp32 gradient per step: 2 (W - 1) * 4 bytes * n, K = 2 steps per round
    assert all(m["bytes_round"] == 2 * 2 * 4 * n for m in metrics)
    assert all(math.isfinite(m["train_loss"]) for m in metrics)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert len(state["trainer"]["rank_streams"]) == 2
