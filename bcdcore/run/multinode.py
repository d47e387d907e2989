"""`bcdcore run` on one node of a multi-node run (`[distributed] nnodes > 1`, or `--nnodes/--node-rank/--rdzv`).

Every node runs the same command (its own --node-rank). Each node's launcher validates the recipe, then runs
its `nproc` ranks under torchrun's elastic agent; the agents meet through the c10d rendezvous at
`rdzv_endpoint` (node 0 hosts its store). No launcher creates a run directory: the ranks are ordinary
`bcdcore run RECIPE` processes of an external-torchrun run, so global rank 0 (wherever the rendezvous put it)
creates the one run directory under --runs-dir, holding its writer lock, and broadcasts its path; the other
ranks log beside it (rankN.log) when the runs directory is shared. The ranks tell their launcher the path
through a private hand-off folder (`BCD_NODE_HANDOFF`), so every node prints `run directory: PATH` and,
at the end, one summary line.

A failure ends the run on every node: a rank that raises or dies breaks its peers' collectives, so every
agent ends. Each launcher records its own root cause as nodeK.failure in the run directory; the launcher
that finds the run without a final state, once it holds the writer lock (rank 0 gone), writes `failed` with
the most telling cause of all nodes (a rank that died beats one that raised; the older error beats a
younger one, which is usually "Connection closed by peer").
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from bcdcore.recipe import Recipe, to_toml
from bcdcore.run.start import check_resumable, require_run_directory

FAILURE_WAIT_S = 3.0  # how long a failed node waits for the other nodes' nodeK.failure before it picks one
LOCK_WAIT_S = 30.0  # how long a node waits for global rank 0 (on another node) to let go of the run


def launch_nodes(recipe: Recipe, runs_dir: Path, resume: Path | None, quiet: bool, announce) -> int:
    """This node's part of a multi-node run: validate, start the local ranks, wait, report in one line."""
    _quiet_store_client()
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError

    from bcdcore.run.distributed import agent_config, nodes_digest, run_agent
    from bcdcore.run.ranks import validate

    if resume is not None:
        require_run_directory(resume)
        check_resumable(resume)  # rank 0 takes the lock; a second writer is refused there
    validate(recipe)
    d = recipe.distributed
    with tempfile.TemporaryDirectory(prefix="bcd-node-") as folder:
        handoff = Path(folder)
        if resume is not None:
            args = ["-m", "bcdcore", "run", "--resume", str(resume)]
        else:
            recipe_file = handoff / "recipe.toml"  # the resolved recipe (the --set values applied)
            recipe_file.write_text(to_toml(recipe.to_dict()))
            args = ["-m", "bcdcore", "run", str(recipe_file), "--runs-dir", str(runs_dir)]
        if quiet or d.node_rank != 0:  # one progress bar, on node 0's terminal at most
            args.append("--quiet")
        # This launcher forwards signals itself: torchrun's agent would leave at once, and the other nodes'
        # agents would then wait out their exit barrier (300 s) after the ranks stopped together.
        config = agent_config(d, d.nproc, d.nnodes, d.rdzv_endpoint, d.rdzv_id or f"bcd-{nodes_digest(recipe)[:16]}",
                              hosts_store=d.node_rank == 0, agent_signals=False)
        os.environ["BCD_NODE_HANDOFF"] = folder
        watcher = _Announcer(handoff, announce)
        received: list[int] = []
        previous = {s: signal.signal(s, lambda signum, frame: _forward(signum, received))
                    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        watcher.start()
        try:
            outcome, detail = run_agent(config, d.nproc, args)
        except RendezvousError as exc:
            if isinstance(exc, RendezvousTimeoutError):
                why = f"the {d.nnodes} nodes did not all join within {config.rdzv_configs['join_timeout']} s"
            else:
                why = f"cannot reach the rendezvous ({type(exc).__name__})"
            announce(f"failed: node {d.node_rank}: {why}; start `bcdcore run` on every node with the same "
                     f"recipe, --nnodes and --rdzv {d.rdzv_endpoint} (node 0 hosts it)")
            return 1
        finally:
            watcher.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if outcome == "ok" and received:
            outcome, detail = "signal", received[0]
        run_dir = watcher.run_dir or (Path(resume) if resume is not None else None)
    if run_dir is None:
        reason = ("the ranks ended before the run directory was made"
                  if outcome != "failed" else _local_reason(detail, None)[2])
        announce(f"failed: node {d.node_rank}: {reason} (check that every node runs the same command and "
                 f"reaches {d.rdzv_endpoint})")
        return 1
    if outcome == "signal":
        return _end(run_dir, d.node_rank, None, 128 + detail, announce)
    if outcome == "failed":
        return _end(run_dir, d.node_rank, _local_reason(detail, run_dir), 1, announce)
    return _end(run_dir, d.node_rank, None, None, announce)


def _quiet_store_client() -> None:
    """torch's C++ store client logs every failed connection attempt with a stack dump; this process says what
    went wrong in one line instead. The level is read when torch loads, so it is set around that (the ranks,
    which inherit the environment, keep the default)."""
    import sys

    if "torch" in sys.modules:
        return
    before = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    try:
        import torch  # noqa: F401
    finally:
        if before is None:
            os.environ.pop("TORCH_CPP_LOG_LEVEL", None)
        else:
            os.environ["TORCH_CPP_LOG_LEVEL"] = before


def _forward(signum: int, received: list[int]) -> None:
    """Pass a signal on to this node's ranks (this process's children): they finish the round, tell every
    rank, and global rank 0 checkpoints and marks the run killed."""
    received.append(signum)
    for pid in _children():
        try:
            os.kill(pid, signum)
        except OSError:  # already gone
            pass


def _children() -> list[int]:
    pids = []
    try:
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
    except (OSError, ValueError):
        pass
    return pids


class _Announcer:
    """Prints `run directory: PATH` as soon as this node's ranks hand the path over."""

    def __init__(self, folder: Path, announce) -> None:
        self.file, self.announce = folder / "run.json", announce
        self.run_dir: Path | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self._poll()  # the ranks may have handed over just before they ended

    def _watch(self) -> None:
        while not self._done.wait(0.1) and self.run_dir is None:
            self._poll()

    def _poll(self) -> None:
        if self.run_dir is not None:
            return
        try:
            self.run_dir = Path(json.loads(self.file.read_text())["run_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        self.announce(f"run directory: {self.run_dir}")


def _local_reason(failures: dict, run_dir: Path | None) -> tuple[bool, float, str]:
    """(a rank died rather than raised, when, one line) for this node's failed ranks."""
    from bcdcore.run.distributed import root_cause

    rank, reason = root_cause(failures, run_dir if run_dir is not None else Path("/nonexistent"))
    when = min(f.timestamp for f in failures.values())
    if "raised:" in reason and run_dir is not None:
        try:
            when = float(json.loads((run_dir / f"rank{rank}.error").read_text()).get("t", when))
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    return "died" in reason or "exited" in reason, when, reason


def _end(run_dir: Path, node: int, failure: tuple[bool, float, str] | None, code: int | None, announce) -> int:
    from bcdcore.run.distributed import finish
    from bcdcore.rundir import read_events, read_status
    from bcdcore.runlock import RunLock, RunLockedError

    if failure is not None:
        _write_failure(run_dir, node, failure)
        time.sleep(FAILURE_WAIT_S)  # the other nodes' agents notice the failure and report theirs
        failure = _best_failure(run_dir, failure)
    if not (run_dir / "status.json").exists():  # no shared file system: global rank 0 is elsewhere
        if failure is not None:
            announce(f"failed: {failure[2]}")
            return 1
        announce(f"done on node {node}: the run's record is in {run_dir} on the node of global rank 0")
        return 0 if code is None else code
    def ended() -> bool:  # rank 0 (or another node's launcher) wrote the end; a rank 0 that raised leaves it
        return read_status(run_dir).get("state") in ("finished", "killed", "failed") and bool(
            read_events(run_dir, "end"))

    lock = None
    if failure is not None or not ended():
        try:  # rank 0 is gone once its agent ended; wait for it where it runs on another node
            lock = RunLock(run_dir).acquire(wait_s=LOCK_WAIT_S)
        except (RunLockedError, OSError):
            announce(f"failed: {failure[2]}" if failure is not None else
                     f"ended on node {node}; the run's writer is still alive elsewhere: see {run_dir}")
            return 1 if failure is not None or code is None else code
        if ended():
            failure = None
    try:
        code, summary = finish(run_dir, failure[2] if failure is not None else None, code)
    finally:
        if lock is not None:
            lock.release()
    announce(summary)
    return code


def _write_failure(run_dir: Path, node: int, failure: tuple[bool, float, str]) -> None:
    from bcdcore.rundir import write_json_atomic

    try:
        write_json_atomic(run_dir / f"node{node}.failure", {"died": failure[0], "t": failure[1],
                                                             "reason": failure[2]})
    except OSError:  # not a shared file system: this node's cause is still printed
        pass


def _best_failure(run_dir: Path, mine: tuple[bool, float, str]) -> tuple[bool, float, str]:
    """The most telling cause among all nodes': a rank that died first, else the oldest error."""
    found = [mine]
    for path in sorted(run_dir.glob("node*.failure")):
        try:
            data = json.loads(path.read_text())
            found.append((bool(data["died"]), float(data["t"]), str(data["reason"]).splitlines()[0]))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue  # half-written or foreign: this node's own cause still counts
    return min(found, key=lambda f: (not f[0], f[1]))
