"""A distributed run: the single-process loop (`Run`) with a communicator. Every rank trains its own blocks
(or, in `entire` mode, its shard of minibatches) and rank 0 records; the hooks below are where the ranks meet:
a checkpoint gathers every rank's trainer state, a round begins and ends with the exchange of damped blocks,
the leader's verdict and any rank's signal are shared in one collective, and lambda = "auto" is measured once
and broadcast. The loop itself has no branch on distribution.
"""
from __future__ import annotations

import os
import signal

from bcdcore.algorithm import RoundResult
from bcdcore.checkpoint import to_cpu
from bcdcore.run.distributed import Comm, launched_by_bcdcore, write_rank_error, write_rank_file
from bcdcore.run.loop import Run
from bcdcore.run.prepare import Prepared
from bcdcore.rundir import RunDir


class DistributedRun(Run):
    keeps_signal_handlers = True  # a rank gets each signal twice (terminal and launcher): the second must not
    #                               cut the round short, and the launcher's teardown must not cut the record

    def __init__(self, prepared: Prepared, rundir: RunDir, comm: Comm, resume: bool = False) -> None:
        self.comm = comm
        self.leader = comm.leader
        super().__init__(prepared, rundir, resume=resume)
        comm.local_signal = lambda: self.signals.received or 0

    # --- checkpoints: a collective; rank 0 writes the merged state
    def _trainer_state_to_save(self) -> dict | None:
        states = self.comm.gather_object(to_cpu(self.p.trainer.state_dict()))
        return self.p.trainer.merge_states(states) if self.leader else None

    def _extra_state(self) -> dict:
        return {"comm": self.comm.state_dict()}

    def _template_trainer_state(self, trainer_state: dict) -> dict:
        if "stream" in trainer_state:  # entire mode: every rank's minibatch stream
            trainer_state["rank_streams"] = [trainer_state["stream"]] * self.comm.world
        return trainer_state

    def _load_extra_state(self, state: dict) -> None:
        if state.get("comm") is not None:  # older checkpoints lack it
            self.comm.load_state_dict(state["comm"])

    # --- the record
    def _start_fields(self) -> tuple[dict, dict]:
        r = self.p.recipe
        write_rank_file(self.rundir.path, self.comm.rank, "pid", f"{os.getpid()}\n")
        status = {"world_size": self.comm.world, "launcher_pid": os.getppid() if launched_by_bcdcore() else None}
        start = {"world_size": self.comm.world, "dist_backend": r.distributed.backend}
        if r.algorithm.mode == "blockwise":
            start["block_owner"] = list(self.comm.owner)
        return status, start

    def _metric_fields(self, wall: float) -> tuple[int, dict]:
        return self.comm.bytes_total, self.comm.metrics(wall)

    def _defer_end_record(self, reason: str) -> bool:
        write_rank_error(self.rundir.path, self.comm.rank, reason)  # the traceback is in the log already
        return launched_by_bcdcore()  # the launcher names the rank that failed first and ends the record

    # --- rounds
    def _begin_round(self) -> None:
        self.comm.begin_round()

    def _end_round(self) -> None:
        self.comm.end_round()

    def _follow_round(self, t: int, result: RoundResult) -> tuple[str, str] | None:
        self.file_log.info("round %d train_loss %.5g", t, result.train_loss)
        return self._decide(None, None)

    def _after_recorded_round(self, verdict, event) -> tuple[str, str] | None:
        return self._decide(verdict, event)

    def _share_lambdas(self, lams: list[float] | None) -> list[float]:
        return self.comm.broadcast_object(lams)

    def _decide(self, verdict, event) -> tuple[str, str] | None:
        """Distributed: every rank learns the leader's verdict and any rank's signal at once, then all take
        the same branch (the checkpoint is a collective). Codes: 1 finished, 2 other verdict, 4 checkpoint."""
        r = self.p.recipe
        code = 0
        if self.leader:
            if verdict is not None:
                code = 1 if verdict[0] == "finished" else 2
            elif r.run.checkpoint_every and self.round % r.run.checkpoint_every == 0:
                code = 4
        code, signum = self.comm.decide(code, self.signals.received or 0)
        if code & 3 == 1:
            self._save_checkpoint()
            if self.leader:
                self.final_metrics = event
            return verdict or ("finished", "rounds done")
        if code & 3 == 2:
            return verdict or ("failed", "stopped by rank 0")
        if signum:
            self.signals.received = signum
            self._save_checkpoint()
            return "killed", f"killed by {signal.Signals(signum).name}"
        if code & 4:
            self._save_checkpoint()
        return None
