"""A distributed run: the single-process loop (`Run`) with a communicator. Every rank trains its own blocks
(or, in `entire` mode, its shard of minibatches) and rank 0 records; the hooks below are where the ranks meet:
a checkpoint gathers every rank's trainer state, lambda = "auto" is measured once and broadcast, and

- blockwise: a round is one collective (bcdcore.run.collective) carrying the damped blocks, reports, losses,
  any rank's signal and rank 0's stop code for the previous round. Ranks other than 0 start the next round
  while rank 0 records; when rank 0 stops, they take that round back (a snapshot taken as it began). The
  blocks are owned by FLOP cost (the run's flop table), rank 0 taking the lightest share.
- entire: the leader's verdict and any rank's signal are shared in one all_reduce after each round.

The loop itself has no branch on distribution.
"""
from __future__ import annotations

import os
import signal

from bcdcore.algorithm import RoundResult
from bcdcore.checkpoint import clone_state, save_checkpoint, to_cpu
from bcdcore.run.collective import STOP_STATES, LeaderStopped, RoundComm, balance_blocks
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
        # blockwise with a RoundComm: one collective per round (bcdcore.run.collective)
        self.piggyback = prepared.recipe.algorithm.mode == "blockwise" and isinstance(comm, RoundComm)
        self._inflight = None  # a rank other than 0: the state its current round started from
        if self.piggyback:
            comm.piggyback, comm.K = True, prepared.recipe.algorithm.K
            costs = [self.flop_table.block_pass(i) for i in range(prepared.params.n_blocks)]
            if sum(costs) > 0:  # a model none of whose operations counts keeps the parameter-count split
                comm.owner = balance_blocks(costs, comm.world)
            self.file_log.info("%s", comm.open_exchange(prepared.params.flat.device))

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
            if self.piggyback:
                start["exchange"] = self.comm.exchange
        return status, start

    def _metric_fields(self, wall: float) -> tuple[int, dict]:
        return self.comm.bytes_total, self.comm.metrics(wall)

    def _defer_end_record(self, reason: str) -> bool:
        write_rank_error(self.rundir.path, self.comm.rank, reason)  # the traceback is in the log already
        return launched_by_bcdcore()  # the launcher names the rank that failed first and ends the record

    # --- rounds
    def _begin_round(self) -> None:
        self.comm.begin_round()
        if self.piggyback and not self.leader:  # this round may be taken back (rank 0 stopped before it)
            p = self.p
            self._inflight = (p.params.flat.detach().clone(), p.params.snapshot_buffers(),
                              clone_state(p.trainer.state_dict()))

    def _end_round(self) -> None:
        self._inflight = None
        self.comm.end_round()

    def _follow_round(self, t: int, result: RoundResult) -> tuple[str, str] | None:
        self.file_log.info("round %d train_loss %.5g", t, result.train_loss)
        if not self.piggyback:
            return self._decide(None, None)
        r = self.p.recipe
        signum = self.comm.peer_signal
        if t >= r.run.rounds or signum:  # every rank knows the run ends with this round
            self._checkpoint(save=False)
            if signum:
                self.signals.received = signum
                return "killed", f"killed by {signal.Signals(signum).name}"
            return "finished", "rounds done"
        if r.run.checkpoint_every and t % r.run.checkpoint_every == 0:
            self._checkpoint(save=False)
        return None  # on to the next round at once: rank 0 may still stop it (LeaderStopped)

    def _after_recorded_round(self, verdict, event) -> tuple[str, str] | None:
        if not self.piggyback:
            return self._decide(verdict, event)
        r, t = self.p.recipe, self.round
        keep = verdict is None or verdict[0] == "finished"  # a failed run's state is not checkpointed
        signum = self.comm.peer_signal
        if t >= r.run.rounds or signum:  # the same branch as the other ranks' (_follow_round)
            self._checkpoint(save=keep)
            if verdict is not None:
                if verdict[0] == "finished":
                    self.final_metrics = event
                return verdict
            self.signals.received = signum
            return "killed", f"killed by {signal.Signals(signum).name}"
        saved = False
        if r.run.checkpoint_every and t % r.run.checkpoint_every == 0:
            self._checkpoint(save=keep)
            saved = keep
        local = self.signals.received or 0
        if verdict is None and not local:
            return None
        code = 3 if verdict is None else (1 if verdict[0] == "finished" else 2)
        self._send_stop(code, local)
        self._checkpoint(save=keep and not saved)
        if verdict is not None:
            if verdict[0] == "finished":
                self.final_metrics = event
            return verdict
        return "killed", f"killed by {signal.Signals(local).name}"

    def _send_stop(self, code: int, signum: int) -> None:
        """Rank 0 ends the run after this round, in the slot of the collective the others are in (or heading
        for): the next round's, or the lambda broadcast that starts it."""
        t = self.round + 1
        every_lam = self.p.recipe.algorithm.lambda_every
        if self.auto_lambda and (t == 1 or (every_lam and (t - 1) % every_lam == 0)):
            self.comm.share_floats(None, self.p.params.n_blocks, code, signum)
            return
        trainer = self.p.trainer
        state = trainer.active_generator.get_state()  # peek at round t's active set, the others drew it
        active = trainer.active_blocks(t)
        trainer.active_generator.set_state(state)
        self.comm.send_stop(code, signum, self.p.params, active)

    def _loop(self, progress) -> tuple[str, str]:
        try:
            return super()._loop(progress)
        except LeaderStopped as stop:  # a rank other than 0: rank 0 ended the run after the previous round
            if self._inflight is not None:
                flat, buffers, trainer_state = self._inflight
                self._inflight = None
                params = self.p.params
                params.flat.detach().copy_(flat)
                params.restore_buffers(buffers)
                self.p.trainer.load_state_dict(trainer_state)
            self.round -= 1
            self._checkpoint(save=False)
            if stop.code == 3:
                self.signals.received = stop.signum or signal.SIGTERM
                return "killed", f"rank 0 killed by {signal.Signals(self.signals.received).name}"
            return STOP_STATES.get(stop.code, ("failed", "stopped by rank 0"))

    def _checkpoint(self, save: bool) -> None:
        """The checkpoint collective; rank 0 writes the file when `save`."""
        trainer_state = self._trainer_state_to_save()
        if trainer_state is not None and save:
            save_checkpoint(self.rundir.checkpoint_path, self._checkpoint_state(trainer_state))

    def _share_lambdas(self, lams: list[float] | None) -> list[float]:
        if self.piggyback:
            return self.comm.share_floats(lams, self.p.params.n_blocks)
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
