"""Multi-node runs on one box: two `bcdcore run --nnodes 2 --node-rank K --rdzv 127.0.0.1:PORT` launchers (one
rank each) meet through torchrun's c10d rendezvous. The run equals the 1-process run bit for bit, only global
rank 0 writes the one run directory, a killed rank ends both nodes with one line naming it, and a run stopped
by SIGTERM resumes on both nodes to the uninterrupted run's parameters.
"""
from __future__ import annotations

import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import dist_recipe, run_cli, start_cli, wait_for

from bcdcore.recipe import RecipeError, load_recipe
from bcdcore.rundir import read_events, read_status

ONE_EACH = dist_recipe("nodes", timeout_s=30).replace("nproc = 2", "nproc = 1")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def _node(k: int, port: int) -> list[str]:
    return ["--nnodes", "2", "--node-rank", str(k), "--rdzv", f"127.0.0.1:{port}", "--quiet"]


def _both(tmp_path: Path, *args: str, extra: tuple = ()):
    port = _port()
    with ThreadPoolExecutor(2 + len(extra)) as pool:
        nodes = [pool.submit(run_cli, *args, *_node(k, port), cwd=tmp_path, timeout=180) for k in (0, 1)]
        others = [pool.submit(run_cli, *e, cwd=tmp_path, timeout=180) for e in extra]
        return [n.result() for n in nodes], [o.result() for o in others]


def _run_dir(stdout: str) -> Path:
    first = stdout.splitlines()[0]
    assert first.startswith("run directory: "), stdout
    return Path(first.removeprefix("run directory: "))


def _strip(e: dict) -> dict:
    return {k: v for k, v in e.items() if k not in ("t", "wall_s", "bytes_comm", "bytes_round", "comm_sim_s",
                                                     "sim_time_s")}


def test_recipe_keys_and_flags(tmp_path):
    r = load_recipe(_write(tmp_path, ONE_EACH), ["distributed.nnodes=2", "distributed.node_rank=1",
                                                 'distributed.rdzv_endpoint="node0:29500"'])
    assert (r.distributed.nnodes, r.distributed.node_rank, r.distributed.rdzv_endpoint) == (2, 1, "node0:29500")
    for bad, key in ((["distributed.nnodes=2"], "rdzv_endpoint"),
                     (["distributed.node_rank=1"], "node_rank"),
                     (['distributed.rdzv_endpoint="node0"'], "rdzv_endpoint"),
                     (['distributed.rdzv_endpoint="a:70000"'], "rdzv_endpoint"),
                     (['distributed.rdzv_id="a b"'], "rdzv_id"),
                     (["distributed.nnodes=0"], "nnodes")):
        with pytest.raises(RecipeError, match=key):
            load_recipe(tmp_path / "recipe.toml", bad)
    with pytest.raises(RecipeError, match="jacobi"):
        load_recipe(tmp_path / "recipe.toml", ['algorithm.schedule="gauss_seidel"', "distributed.nnodes=2",
                                               'distributed.rdzv_endpoint="h:1"'])
    out = run_cli("run", "recipe.toml", "--nnodes", "2", "--node-rank", "3", "--rdzv", "h:1", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: --node-rank: must be in [0, nnodes = 2), got 3"]
    assert not (tmp_path / "runs").exists()


def test_two_nodes_equal_one_process(tmp_path):
    recipe = _write(tmp_path, ONE_EACH)
    (n0, n1), (one,) = _both(tmp_path, "run", recipe, "--runs-dir", "shared",
                             extra=(("run", str(recipe), "--runs-dir", "one", "--quiet"),))
    for out in (n0, n1, one):
        assert out.returncode == 0, out.stdout + out.stderr
    d2 = tmp_path / _run_dir(n0.stdout)
    assert _run_dir(n1.stdout) == _run_dir(n0.stdout)  # both nodes name the one run directory
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [d2.name]
    assert n0.stdout.splitlines()[-1] == n1.stdout.splitlines()[-1] == one.stdout.splitlines()[-1]
    d1 = tmp_path / _run_dir(one.stdout)
    c1 = torch.load(d1 / "checkpoint.pt", weights_only=False)
    c2 = torch.load(d2 / "checkpoint.pt", weights_only=False)
    assert torch.equal(c1["flat"], c2["flat"])
    for a, b in zip(c1["trainer"]["solver"]["state"], c2["trainer"]["solver"]["state"]):
        assert torch.equal(a, b)
    assert [_strip(e) for e in read_events(d1, "block")] == [_strip(e) for e in read_events(d2, "block")]
    assert [_strip(e) for e in read_events(d1, "metric")] == [_strip(e) for e in read_events(d2, "metric")]
    status = read_status(d2)
    assert status["state"] == "finished" and status["world_size"] == 2
    assert (d2 / "rank1.log").is_file() and (d2 / "rank1.pid").is_file()
    assert not list(d2.glob("node*.failure"))


def _start_nodes(tmp_path: Path, text: str, port: int):
    recipe = _write(tmp_path, text)
    procs = [start_cli("run", recipe, "--runs-dir", "runs", *_node(k, port), cwd=tmp_path) for k in (0, 1)]
    firsts = [p.stdout.readline() for p in procs]
    for first, p in zip(firsts, procs):
        assert first.startswith("run directory: "), first + p.stderr.read()
    run_dir = tmp_path / firsts[0].strip().removeprefix("run directory: ")
    wait_for(lambda: (run_dir / "rank1.pid").is_file() and len(read_events(run_dir, "metric")) >= 2, 90,
             "the ranks to start")
    return procs, run_dir


def test_killed_rank_ends_both_nodes_naming_it(tmp_path):
    long = ONE_EACH.replace("rounds = 3", "rounds = 100000").replace("every = 1", "every = 0")
    procs, run_dir = _start_nodes(tmp_path, long, _port())
    try:
        os.kill(int((run_dir / "rank1.pid").read_text()), signal.SIGKILL)
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 1, out + err
        assert out.splitlines()[-1].startswith("failed: rank 1 died (SIGKILL"), out + err
        assert "Traceback" not in err
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["error"].startswith("rank 1 died (SIGKILL")
    assert len(read_events(run_dir, "end")) == 1


def test_sigterm_then_resume_on_both_nodes_equals_uninterrupted(tmp_path):
    text = ONE_EACH.replace("rounds = 3", "rounds = 60").replace("every = 1", "every = 0")
    procs, run_dir = _start_nodes(tmp_path, text, _port())
    try:
        procs[1].send_signal(signal.SIGTERM)  # the node without the rendezvous store
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert read_status(run_dir)["state"] == "killed", outs
    stopped_at = read_events(run_dir, "metric")[-1]["round"]
    assert stopped_at < 60
    (n0, n1), (one,) = _both(tmp_path, "run", "--resume", str(run_dir),
                             extra=(("run", "recipe.toml", "--runs-dir", "one", "--quiet"),))
    for out in (n0, n1, one):
        assert out.returncode == 0, out.stdout + out.stderr
    assert _run_dir(n0.stdout) == _run_dir(n1.stdout) == run_dir
    assert read_status(run_dir)["state"] == "finished"
    c1 = torch.load(tmp_path / _run_dir(one.stdout) / "checkpoint.pt", weights_only=False)
    c2 = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert torch.equal(c1["flat"], c2["flat"])
    assert [_strip(e) for e in read_events(run_dir, "metric")] == [
        _strip(e) for e in read_events(tmp_path / _run_dir(one.stdout), "metric")]


def test_a_node_alone_says_so_in_one_line(tmp_path):
    recipe = _write(tmp_path, ONE_EACH)
    port = _port()
    out = run_cli("run", recipe, "--runs-dir", "runs", *_node(0, port), "--set", "distributed.timeout_s=6",
                  cwd=tmp_path, timeout=180)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        f"failed: node 0: the 2 nodes did not all join within 6 s; start `bcdcore run` on every node with the "
        f"same recipe, --nnodes and --rdzv 127.0.0.1:{port} (node 0 hosts it)"]
    assert out.stderr.strip() == ""
    assert not (tmp_path / "runs").exists()


def test_nodes_with_different_recipes_fail_naming_it(tmp_path):
    """With one rdzv_id the nodes meet (the default id differs with the recipe: they would not); a node whose
    recipe differs from global rank 0's fails the run in one line."""
    recipe = _write(tmp_path, ONE_EACH.replace("timeout_s = 30", 'timeout_s = 30\nrdzv_id = "same"'))
    port = _port()
    with ThreadPoolExecutor(2) as pool:
        outs = [pool.submit(run_cli, "run", recipe, "--runs-dir", "runs", *_node(k, port),
                            *(["--set", "algorithm.K=3"] if k == 1 else []), cwd=tmp_path, timeout=180)
                for k in (0, 1)]
        outs = [o.result() for o in outs]
    for out in outs:
        assert out.returncode == 1, out.stdout + out.stderr
        last = out.stdout.splitlines()[-1]
        assert last.startswith("failed: rank ") and "this node's recipe differs from global rank 0's" in last, last
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert read_status(run_dir)["state"] == "failed"
