"""Distributed block workers on torch.distributed: the rank side (`Comm`) and the launcher side (`launch`).

One process per rank, started by torchrun's elastic agent (`torch.distributed.launcher.api.elastic_launch`,
the machinery behind `torchrun`), which `bcdcore run` runs in-process when `[distributed] nproc > 1`; or
started by an external `torchrun ... -m bcdcore run RECIPE` (multi-node), where the bcdcore processes are the
ranks themselves.

Blockwise (Algorithm 1, Jacobi): `Comm` holds the process group and the byte accounting; the round's exchange
is `bcdcore.run.collective.RoundComm`: blocks owned by measured cost (FLOPs), and ONE all_gather per round of a
flat byte buffer per rank carrying the damped slices, the blocks' buffers, the reports and per-step losses and
the leader's stop code, so every rank holds the same x_{t+1}, bit for bit, as the 1-process run (see
docs/distributed.md, "How a round communicates"). `assign_blocks` is the greedy both use (costliest block
first, onto the least-loaded rank, lowest rank on ties). Rank 0 (the leader) evaluates, measures, checkpoints and writes the run directory; other ranks write
only rankN.pid, rankN.log and, when they raise, rankN.error.

Communication accounting (per round, in metric events): `bytes_round` is the model state (parameters and
buffers) the round put on the wire, counted as a ring all-gather/all-reduce would move it, summed over all
ranks: all-gather of per-rank payloads P_r -> (W - 1) * sum_r P_r; all-reduce of N bytes -> 2 (W - 1) N.
Control messages (reports, losses, decisions: a few hundred bytes) are not counted. `bytes_comm` is the
running total (like grad_evals and samples). The latency + bandwidth model adds, per collective,
communication_delay + (largest number of bytes one rank receives) / bandwidth; the sum is `comm_sim_s` and
`sim_time_s` = wall_s + comm_sim_s (with `sleep = true` the ranks really sleep that long instead, and
sim_time_s = wall_s).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from bcdcore.recipe import DistributedConfig

log = logging.getLogger("bcdcore.distributed")

ENV_LAUNCHED = "BCD_DIST_LAUNCHED"  # set by the bcdcore launcher: it finalises failures in status.json


def launched_by_bcdcore() -> bool:
    return os.environ.get(ENV_LAUNCHED) == "1"


def assign_blocks(sizes: list[int], world: int) -> list[int]:
    """owner[i] for every block: largest block first onto the least-loaded rank (lowest rank on ties)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def byte_view(t: Tensor) -> Tensor:
    """A contiguous tensor's storage seen as uint8 (a view: writes go through)."""
    return t.reshape(-1).view(torch.uint8)


class Comm:
    """One rank's side of a distributed run."""

    def __init__(self, cfg, device: torch.device) -> None:
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.leader = self.rank == 0
        self.owner: list[int] = []
        self.bytes_total = 0  # running totals
        self.sim_total = 0.0
        self.bytes_round = 0  # of the last round
        self.sim_round = 0.0
        self.local_signal = lambda: 0

    # --- ownership
    def assign(self, sizes_bytes: list[int]) -> None:
        self.owner = assign_blocks(sizes_bytes, self.world)

    def owns(self, i: int) -> bool:
        return self.owner[i] == self.rank

    # --- accounting
    def begin_round(self) -> None:
        self.bytes_round, self.sim_round = 0, 0.0

    def account(self, wire_bytes: int, max_received: int) -> None:
        """One collective: `wire_bytes` in total on the wire, the busiest rank receiving `max_received`."""
        self.bytes_round += wire_bytes
        self.sim_round += self.cfg.communication_delay + (max_received / self.cfg.bandwidth
                                                          if self.cfg.bandwidth > 0 else 0.0)

    def end_round(self) -> None:
        """Close the round's accounting; the stop decision that follows is one more message (latency)."""
        self.account(0, 0)
        self.bytes_total += self.bytes_round
        self.sim_total += self.sim_round
        if self.cfg.sleep and self.sim_round > 0:
            time.sleep(self.sim_round)

    def metrics(self, wall_s: float) -> dict:
        return {"bytes_round": self.bytes_round, "comm_sim_s": self.sim_total,
                "sim_time_s": wall_s if self.cfg.sleep else wall_s + self.sim_total}

    def state_dict(self) -> dict:
        # bytes_comm and comm_sim_s are running totals like grad_evals: a resumed run continues them
        return {"bytes_total": self.bytes_total, "sim_total": self.sim_total}

    def load_state_dict(self, state: dict) -> None:
        self.bytes_total, self.sim_total = int(state["bytes_total"]), float(state["sim_total"])

    # --- collectives
    def exchange_blocks(self, params, active: list[int]) -> None:
        """All ranks end with the owners' values of every active block (parameters and buffers)."""
        def nbytes(i: int) -> int:
            return (params.sizes[i] * params.flat.element_size()
                    + sum(b.numel() * b.element_size() for b in params.block_buffers[i]))

        per_rank: list[list[int]] = [[] for _ in range(self.world)]
        for i in active:
            per_rank[self.owner[i]].append(i)
        sizes = [sum(nbytes(i) for i in blocks) for blocks in per_rank]
        longest = max(sizes)
        total = sum(sizes)
        self.account((self.world - 1) * total, max(total - s for s in sizes))
        if longest == 0:
            return
        mine = torch.zeros(longest, dtype=torch.uint8, device=params.flat.device)
        offset = 0
        for i in per_rank[self.rank]:
            for t in (params.block(i), *params.block_buffers[i]):
                n = t.numel() * t.element_size()
                mine[offset:offset + n].copy_(byte_view(t))
                offset += n
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        for r, blocks in enumerate(per_rank):
            if r == self.rank:
                continue
            offset = 0
            for i in blocks:
                for t in (params.block(i), *params.block_buffers[i]):
                    n = t.numel() * t.element_size()
                    byte_view(t).copy_(gathered[r][offset:offset + n])
                    offset += n

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        self.account(0, 0)  # control message: latency only, bytes not counted
        return out

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj) -> list | None:
        out = [None] * self.world if self.leader else None
        dist.gather_object(obj, out, dst=0)
        return out

    def account_all_reduce(self, n: int) -> None:
        self.account(2 * (self.world - 1) * n, 2 * (self.world - 1) * n // self.world)

    def sum_floats(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        self.account(0, 0)
        return t.tolist()

    def decide(self, code: int, signum: int) -> tuple[int, int]:
        """One all_reduce (max) of (leader's decision code, any rank's signal): everyone gets both."""
        t = torch.tensor([code if self.leader else 0, signum or 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0]), int(t[1])


def init_rank(cfg: DistributedConfig) -> tuple[int, int, int]:
    """Join the process group torchrun set up (env://). Returns (rank, world, local_rank)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.backend
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
    return dist.get_rank(), dist.get_world_size(), local_rank


def rank_device(device_name: str, local_rank: int) -> str:
    """A rank's device: "auto"/"cuda" become cuda:LOCAL_RANK where CUDA exists; "cpu" and "cuda:N" stay."""
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device_name


def write_rank_file(run_dir: Path, rank: int, suffix: str, text: str) -> None:
    try:
        (Path(run_dir) / f"rank{rank}.{suffix}").write_text(text)
    except OSError:  # another node without the shared run directory
        pass


def write_rank_error(run_dir: Path, rank: int, error: str, details: str = "") -> None:
    """rankN.error: when this rank raised and the one-line error; the launcher names the rank whose error is
    oldest (the others usually fail because of it: "Connection closed by peer"). `details` (a traceback) goes
    to the rank's log, rank 0's being log.txt."""
    write_rank_file(run_dir, rank, "error", json.dumps({"t": time.time(), "error": error}))
    if details:
        try:
            with open(Path(run_dir) / ("log.txt" if rank == 0 else f"rank{rank}.log"), "a") as f:
                f.write(details if details.endswith("\n") else details + "\n")
        except OSError:
            pass


ENV_HANDOFF = "BCD_NODE_HANDOFF"  # a multi-node launcher's folder: its ranks leave the run directory's path there


def nodes_digest(recipe) -> str:
    """The recipe's digest with node_rank left out: every node of one run has the same (the default
    rendezvous id, and the check that the nodes were given the same recipe)."""
    import copy

    same = copy.deepcopy(recipe)
    same.distributed.node_rank = 0
    return same.digest()


def hand_off(run_dir: Path) -> None:
    """Tell this node's bcdcore launcher (if it asked) where the run directory is: it announces it and
    reads the run's end there."""
    folder = os.environ.get(ENV_HANDOFF)
    if folder and os.environ.get("LOCAL_RANK", "0") == "0":
        from bcdcore.rundir import write_json_atomic

        try:
            write_json_atomic(Path(folder) / "run.json", {"run_dir": str(run_dir), "rank": dist.get_rank()})
        except OSError:  # the launcher's folder is gone: it is not waiting for us any more
            pass


# ----------------------------------------------------------------------------------------------------------
# launcher side (the `bcdcore run` process)

def root_cause(failures: dict, run_dir: Path) -> tuple[int, str]:
    """The failure that ended the group. The agent records failures in the order it detects them and then
    stops the others with SIGTERM (SIGKILL after a grace period), so: among the failures of the first
    second, a rank that died by a signal other than the teardown's SIGTERM/SIGINT (it left no rankN.error),
    else the rank whose rankN.error is oldest, else the first one detected."""
    errors = {}
    for rank in failures:
        try:
            errors[rank] = json.loads((run_dir / f"rank{rank}.error").read_text())
        except (OSError, ValueError):
            pass
    first = min(f.timestamp for f in failures.values())
    candidates = [r for r, f in failures.items() if f.timestamp <= first + 1]  # detection order
    teardown = (-signal.SIGTERM, -signal.SIGINT)
    died = [r for r in candidates if r not in errors and failures[r].exitcode < 0
            and failures[r].exitcode not in teardown]
    raised = sorted((errors[r].get("t", 0), r) for r in candidates if r in errors)
    if died:
        rank = died[0]
    elif raised:
        rank = raised[0][1]
        return rank, f"rank {rank} raised: {errors[rank].get('error', '?')}"
    else:
        rank = candidates[0]
    code = failures[rank].exitcode
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return rank, f"rank {rank} died ({name}, pid {failures[rank].pid})"
    return rank, f"rank {rank} exited with code {code} (pid {failures[rank].pid})"


def agent_config(cfg, nproc: int, nodes: int = 1, endpoint: str = "localhost:0", run_id: str = "",
                 hosts_store: bool = True, agent_signals: bool = True):
    """torchrun's LaunchConfig: c10d rendezvous, no restarts. One node: a private store on a free port of
    this host. Several: every node's agent meets at `endpoint`, whose store node 0 hosts (`hosts_store`)."""
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(min_nodes=nodes, max_nodes=nodes, nproc_per_node=nproc,
                        run_id=run_id or uuid.uuid4().hex[:12], rdzv_backend="c10d", rdzv_endpoint=endpoint,
                        rdzv_configs={"is_host": hosts_store, "join_timeout": max(5, int(cfg.timeout_s))},  # nodes join within it
                        max_restarts=0, monitor_interval=0.1, shutdown_timeout=max(30, int(cfg.timeout_s)),
                        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT" if agent_signals else "")


def run_agent(config, nproc: int, args: list[str]) -> tuple[str, object]:
    """Run the ranks (`python ARGS...`) under torchrun's elastic agent and wait: ("ok", None),
    ("signal", signum) or ("failed", {rank: failure}) (global ranks). Signals to this process are forwarded to
    the ranks (the agent does it), which finish the round; rank 0 checkpoints and marks the run killed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    for name in list(logging.root.manager.loggerDict):  # bcdcore names the failed rank itself
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[ENV_LAUNCHED] = "1"  # inherited by the ranks
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        elastic_launch(config, sys.executable)(*args)
    except SignalException as exc:
        return "signal", int(exc.sigval)
    except ChildFailedError as exc:
        return "failed", exc.failures
    return "ok", None


def launch(run_dir: Path, nproc: int, cfg, resume: bool, quiet: bool) -> tuple[int, str]:
    """Run the ranks of a one-host run on this host (standalone rendezvous) and wait.
    Returns (exit code, one-line summary)."""
    args = ["-m", "bcdcore", "run", "--attach", str(run_dir)]
    if resume:
        args.append("--attach-resume")
    if quiet:
        args.append("--quiet")
    run_dir = Path(run_dir)
    outcome, detail = run_agent(agent_config(cfg, nproc), nproc, args)
    if outcome == "signal":
        return finish(run_dir, None, 128 + detail)
    if outcome == "failed":
        return finish_failed(run_dir, detail)
    return finish(run_dir, None, None)


def finish_failed(run_dir: Path, failures: dict) -> tuple[int, str]:
    """The ranks' group failed. A run whose end rank 0 recorded (it records only an orderly end under this
    launcher, after a collective every rank joined) keeps that end when the failure is a rank dying by a
    signal afterwards, in its teardown: the record is complete; the log says what happened. Else the run
    failed, naming the rank that failed first."""
    from bcdcore.rundir import read_events, read_status

    rank, reason = root_cause(failures, run_dir)
    state = read_status(run_dir).get("state")
    if " died (" in reason and state in ("finished", "killed", "failed") and read_events(run_dir, "end"):
        try:
            with open(run_dir / "log.txt", "a") as f:
                f.write(f"note: {reason} after the run had ended ({state}); the record above is complete\n")
        except OSError:
            pass
        return finish(run_dir, None, None)
    return finish(run_dir, reason, 1)


def finish(run_dir: Path, failure: str | None, code: int | None) -> tuple[int, str]:
    from bcdcore.rundir import RunDir, read_events, read_status

    status = read_status(run_dir)
    state = status.get("state")
    if failure is not None or state not in ("finished", "killed", "failed"):
        # rank 0 could not finish the record (it died, or it raised and left the end to us)
        reason = failure or f"the ranks ended without a final state (exit code {code})"
        rd = RunDir.open(run_dir, lock=False)  # the launcher (this process) holds the lock
        ends = read_events(run_dir, "end")
        if not ends or failure is not None:
            rd.event("end", state="failed", reason=reason)
        rd.write_status(state="failed", ended=time.time(), exit_code=1, error=reason)
        rd.write_arrays()
        rd.close()
        return 1, f"failed: {reason}"
    ends = read_events(run_dir, "end")
    reason = (ends[-1].get("reason") or "") if ends else ""  # checked events: reason may be null
    exit_code = status.get("exit_code")
    if exit_code is None:
        exit_code = {"finished": 0, "failed": 1}.get(state, code or 1)
    summary = f"{state}: {reason}"
    if state == "finished":
        metrics = read_events(run_dir, "metric")
        m = metrics[-1] if metrics else {}
        parts = [f"{k} {m[k]:.4f}" for k in ("test_acc", "test_loss", "val_acc", "val_loss")
                 if isinstance(m.get(k), (int, float))]
        if parts:
            summary += "  |  " + "  ".join(parts)
    return int(exit_code), summary
