"""A blockwise distributed round's communication (bcdcore.run.collective): one tensor collective per round,
reports and losses packed without pickling, blocks owned by FLOP cost, and rank 0's stop taking back the round
the other ranks had already started.
"""
from __future__ import annotations

import json
import math
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import cli_env, dist_recipe, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from bcdcore.algorithm import BlockReport
from bcdcore.run.collective import HEADER, balance_blocks, pack_reports, unpack_reports
from bcdcore.run.distributed import assign_blocks
from bcdcore.rundir import read_events, read_status

DIST = dist_recipe("rounds", timeout_s=30)

# Counts the torch.distributed calls a process makes (the name bcdcore calls: `dist.all_gather`, ...) and writes
# them to $BCD_COUNT_DIR/rank$RANK.json at exit; only the ranks (RANK is set by torchrun) count.
SITECUSTOMIZE = '''
import atexit, json, os
if os.environ.get("BCD_COUNT_DIR") and "RANK" in os.environ:
    import torch.distributed as dist
    counts = {}
    def counting(name, fn):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return call
    for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce", "gather", "scatter",
                 "all_gather_object", "broadcast_object_list", "gather_object", "barrier", "send", "recv"):
        setattr(dist, name, counting(name, getattr(dist, name)))
    from bcdcore.run.host_exchange import HostExchange
    HostExchange.all_gather = counting("host_all_gather", HostExchange.all_gather)
    if os.environ.get("BCD_REFUSE_UNIX") and os.environ["RANK"] == "1":  # a sandbox without Unix sockets
        import socket
        bind = socket.socket.bind
        def refuse(self, address):
            if self.family == socket.AF_UNIX:
                raise PermissionError(13, "Permission denied")
            return bind(self, address)
        socket.socket.bind = refuse
    def dump():
        path = os.path.join(os.environ["BCD_COUNT_DIR"], "rank" + os.environ["RANK"] + ".json")
        with open(path, "w") as f:
            json.dump(counts, f)
    exit_now = os._exit
    def leave(code):  # a rank leaves by os._exit after an orderly end (no atexit handlers run)
        dump()
        exit_now(code)
    os._exit = leave
    atexit.register(dump)
'''


def _run_dir(tmp_path: Path, stdout: str) -> Path:
    first = stdout.splitlines()[0]
    assert first.startswith("run directory: "), stdout
    return tmp_path / first.removeprefix("run directory: ")


# --- ownership by cost

def test_balance_blocks_by_cost_gives_rank_0_the_lightest_share():
    assert balance_blocks([77.0, 72.7, 56.0, 39.0], 2) == [0, 1, 1, 0]  # 116 vs 128.7
    assert balance_blocks([5.0, 5.0, 5.0], 2) == [1, 0, 1]  # greedy puts 10 on one rank: that one is rank 1
    assert balance_blocks([3.0], 3) == [2]  # more ranks than blocks: the idle ranks come first
    assert balance_blocks([], 2) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1e12, allow_nan=False), max_size=24), st.integers(1, 6))
def test_balance_blocks_properties(costs, world):
    owner = balance_blocks(costs, world)
    assert len(owner) == len(costs) and all(0 <= r < world for r in owner)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(world)]
    assert loads == sorted(loads)  # rank 0 the lightest
    if costs:  # greedy costliest-first: no rank exceeds another by more than the costliest block
        assert max(loads) - min(loads) <= max(costs) * (1 + 1e-12)
    assert balance_blocks(costs, world) == owner  # deterministic: every rank computes the same owners


def test_flop_balance_beats_parameter_balance_on_the_benchmark_mlp():
    """The 4-block 256-wide MLP of bench/distributed.py: by parameter count one rank gets the two 256x256
    layers, ~61% of a round's FLOPs; by FLOP cost the larger share is under 53%."""
    from bcdcore.flops import count_table
    from bcdcore.models import block_sizes, build_model
    from bcdcore.params import FlatParams
    from bcdcore.recipe import ModelConfig

    model = build_model(ModelConfig(name="mlp", widths=[256, 256, 256]), (64,), 10, 0)
    params = FlatParams(model, model.blocks)
    x, y = torch.randn(128, 64, generator=torch.Generator().manual_seed(0)), torch.arange(128) % 10
    table = count_table(model, params, torch.nn.functional.cross_entropy, (x, y))
    costs = [table.block_pass(i) for i in range(params.n_blocks)]

    def largest_share(owner):
        return max(sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)) / sum(costs)

    by_params = assign_blocks(block_sizes(model), 2)
    assert largest_share(by_params) > 0.6
    assert largest_share(balance_blocks(costs, 2)) < 0.53


# --- packing reports and losses

finite_or_not = st.floats(allow_nan=True, allow_infinity=True)
reports = st.builds(BlockReport, block=st.integers(0, 10_000), inner_steps=st.integers(0, 64),
                    stopped_early=st.booleans(), residual=finite_or_not, threshold=finite_or_not, dist=finite_or_not,
                    lam=finite_or_not, gamma=finite_or_not, passes=st.integers(0, 64))


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(reports, st.lists(st.floats(width=32), max_size=6)), max_size=5,
                unique_by=lambda item: item[0].block), st.integers(0, 3), st.integers(0, 64))
def test_reports_and_losses_round_trip_bit_for_bit(mine, code, signum):
    K = 6
    blocks = [report.block for report, _ in mine][::-1]  # the layout's order, not the list's
    values = pack_reports(mine, blocks, K, code, signum)
    assert values[:HEADER] == [code, signum]
    meta = torch.tensor(values, dtype=torch.float64).view(torch.uint8).view(torch.float64).tolist()  # the wire
    back = unpack_reports(meta, len(blocks), K)
    by_block = {report.block: (report, losses) for report, losses in mine}
    for (report, losses), i in zip(back, blocks):
        sent, sent_losses = by_block[i]
        for name in vars(sent):
            a, b = getattr(sent, name), getattr(report, name)
            assert type(a) is type(b)
            assert _bits(float(a)) == _bits(float(b)) or (math.isnan(a) and math.isnan(b))
        assert [_bits(v) for v in losses] == [_bits(v) for v in sent_losses]


def test_more_losses_than_K_is_refused():
    report = BlockReport(0, 3, False, 0.0, math.nan, 0.0, 0.1, 1.0, 3)
    with pytest.raises(ValueError, match="more than K"):
        pack_reports([(report, [1.0, 2.0, 3.0])], [0], 2, 0, 0)


# --- real 2-process runs

def test_one_collective_per_round(tmp_path):
    """Counted in the ranks themselves (a sitecustomize wraps torch.distributed and the host exchange): R rounds
    make R exchanges and nothing else per round; the only other collective is the final checkpoint's gather.
    Between ranks of one host the exchange runs over sockets (set up by one broadcast and three all_reduces in
    which the ranks agree that every step worked); with `exchange = "backend"` it is gloo's all_gather, and so
    it is when rank 1 cannot bind a Unix socket: the ranks agree after the first step to keep gloo, and the
    logs say why. All three end with the same parameters, bit for bit."""
    rounds = 5
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    gloo = {"all_gather": rounds, "gather_object": 1}
    cases = {"auto": ("auto", {"broadcast": 1, "all_reduce": 3, "host_all_gather": rounds, "gather_object": 1}),
             "backend": ("backend", gloo),
             "refused": ("auto", {"broadcast": 1, "all_reduce": 1, **gloo})}
    flats = {}
    for case, (exchange, want) in cases.items():
        counts = tmp_path / f"counts-{case}"
        counts.mkdir()
        env = cli_env(BCD_COUNT_DIR=str(counts), **({"BCD_REFUSE_UNIX": "1"} if case == "refused" else {}))
        env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
        recipe = tmp_path / f"{case}.toml"
        recipe.write_text(DIST.replace("rounds = 3", f"rounds = {rounds}")
                          .replace("[distributed]", f'[distributed]\nexchange = "{exchange}"'))
        proc = run_cli("run", recipe, "--runs-dir", "runs", "--quiet", cwd=tmp_path, env=env, timeout=180)
        assert proc.returncode == 0, proc.stderr
        run_dir = _run_dir(tmp_path, proc.stdout)
        assert read_status(run_dir)["state"] == "finished"
        for rank in (0, 1):
            seen = json.loads((counts / f"rank{rank}.json").read_text())
            assert seen == want, (case, rank, seen)
        assert len(read_events(run_dir, "metric")) == rounds
        said = "host sockets" if case == "auto" else "gloo all_gather"
        assert read_events(run_dir, "start")[0]["exchange"] == said
        log = (run_dir / "log.txt").read_text()
        assert f"round exchange: {'Unix-domain sockets' if case == 'auto' else said}" in log
        if case == "refused":
            assert ("(the host's sockets could not be used: another rank could not set up its sockets" in log)
            assert "rank 1 could not listen (Permission denied)" in (run_dir / "rank1.log").read_text()
        flats[case] = torch.load(run_dir / "checkpoint.pt", weights_only=False)["flat"]
    assert torch.equal(flats["auto"], flats["backend"]) and torch.equal(flats["auto"], flats["refused"])


def test_rank_0_stop_takes_back_the_started_round(tmp_path):
    """A stopper ends the run at round s < rounds on rank 0 while rank 1 has already run its part of round
    s + 1: rank 1 takes it back, and the checkpoint (parameters, solver state, streams, active-set generator)
    equals the 1-process run stopped by the same stopper, as do every round's events."""
    long = DIST.replace("rounds = 3", "rounds = 12").replace("every = 1", "every = 0")
    probe = tmp_path / "probe.toml"
    probe.write_text(long.replace("nproc = 2", "nproc = 1"))
    first = run_cli("run", probe, "--runs-dir", "probe", "--quiet", cwd=tmp_path, timeout=180)
    assert first.returncode == 0, first.stderr
    losses = [e["train_loss"] for e in read_events(_run_dir(tmp_path, first.stdout), "metric")]
    target = min(losses[1:4])  # reached first at round 2, 3 or 4
    stop_round = next(t for t, v in enumerate(losses, 1) if v <= target)
    assert stop_round < 12
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(long + f'\n[[stop]]\nkind = "target_loss"\nmetric = "train_loss"\nvalue = {target!r}\n')
    with ThreadPoolExecutor(2) as pool:
        two = pool.submit(run_cli, "run", recipe, "--runs-dir", "two", "--quiet", cwd=tmp_path, timeout=180)
        one = pool.submit(run_cli, "run", recipe, "--runs-dir", "one", "--quiet", "--set", "distributed.nproc=1",
                          cwd=tmp_path, timeout=180)
        two, one = two.result(), one.result()
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    d1, d2 = _run_dir(tmp_path, one.stdout), _run_dir(tmp_path, two.stdout)
    assert read_status(d2)["state"] == "finished" and read_status(d2)["progress"]["round"] == stop_round
    assert "target reached" in read_events(d2, "end")[-1]["reason"]
    c1 = torch.load(d1 / "checkpoint.pt", weights_only=False)
    c2 = torch.load(d2 / "checkpoint.pt", weights_only=False)
    assert c1["round"] == c2["round"] == stop_round
    assert torch.equal(c1["flat"], c2["flat"])
    t1, t2 = c1["trainer"], c2["trainer"]
    assert torch.equal(t1["active_generator"], t2["active_generator"])
    for a, b in zip(t1["solver"]["state"], t2["solver"]["state"]):
        assert torch.equal(a, b)
    assert t1["solver"]["steps"] == t2["solver"]["steps"]
    for a, b in zip(t1["streams"], t2["streams"]):
        assert a["position"] == b["position"] and torch.equal(a["order"], b["order"])
        assert torch.equal(a["generator"], b["generator"])
    keep = ("round", "train_loss", "val_loss", "test_loss", "test_acc", "grad_evals", "samples")
    assert ([{k: e.get(k) for k in keep} for e in read_events(d1, "metric")]
            == [{k: e.get(k) for k in keep} for e in read_events(d2, "metric")])
    assert "stopped by rank 0" in (d2 / "rank1.log").read_text()
