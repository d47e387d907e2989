"""The run's loop (`Run`): Algorithm 1's rounds (or the entire baseline), evaluation, measurements and
lambda = "auto", stoppers, checkpoints, and the run's final record. Exit codes: 0 finished, 1 failed,
128+signal killed; distributed runs take the same loop with a communicator.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
import traceback

from bcdcore.algorithm import RoundResult
from bcdcore.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, to_cpu
from bcdcore.data.images import augmentation_generator
from bcdcore.flops import count, count_table
from bcdcore.measure import MeasureContext, auto_lambda, fixed_batch, training_batches
from bcdcore.models import block_sizes
from bcdcore.recipe import os_reason
from bcdcore.run.console import QuietFileHandler, RoundProgress, error_line, progress_for
from bcdcore.run.prepare import Prepared, evaluate, loss_function
from bcdcore.run.signals import Signals
from bcdcore.rundir import RunDir
from bcdcore.stoppers import build_stoppers, first_verdict

# status.json's progress is rewritten at most this often (and always at the last round and the end): a rewrite
# costs about 1 ms, 5% of a small model's round, and readers also take the round from the metric events,
# which are written every round.
STATUS_EVERY_S = 0.25

log = logging.getLogger("bcdcore.run")


class Run:
    """A single-process run. DistributedRun (bcdcore.run.distributed_run) is the same loop with a communicator:
    it overrides the hooks below (what a checkpoint gathers, what a round shares, who records)."""

    leader = True  # this process writes the run directory (rank 0 of a distributed run)
    keeps_signal_handlers = False  # a rank keeps them to the end: the launcher's teardown SIGTERM must not cut
    #                                the final record short

    def __init__(self, prepared: Prepared, rundir: RunDir, resume: bool = False) -> None:
        self.p, self.rundir = prepared, rundir
        self.raised = False
        r = prepared.recipe
        self.stoppers = build_stoppers(r.stop, r.run.wall_time_s)
        self.round = 0
        self.grad_evals = self.samples = 0
        self.flops = 0.0  # cumulative FLOPs of every pass (bcdcore.flops); grad_evals = flops / table.full
        self.passes = 0  # forward+backward passes of training
        self.wall_before = 0.0  # wall seconds of earlier sessions of this run (resume)
        self._status_at = -math.inf  # time.monotonic() of the last progress written to status.json
        self.t0 = time.perf_counter()  # restarted by execute
        self.signals = Signals(repeat_stops=not self.keeps_signal_handlers)
        self.file_log = self._file_logger()
        self.auto_lambda = r.algorithm.lam == "auto" and r.algorithm.mode == "blockwise"
        train = prepared.data.train
        self.measure_batch = fixed_batch(train.x, train.y, 256, r.run.seed)
        a = r.algorithm
        self.lambda_batches = (training_batches(train.x, train.y, a.lambda_batch_size, a.lambda_batches,
                                                r.run.seed + 1) if self.auto_lambda else [])
        self.flop_table = count_table(prepared.model, prepared.params, loss_function(prepared.data.task),
                                      fixed_batch(train.x, train.y, r.data.batch_size, r.run.seed))
        prepared.trainer.flop_table = self.flop_table
        if resume:
            self._load_checkpoint()

    def _file_logger(self) -> logging.Logger:
        logger = logging.getLogger(f"bcdcore.run.{self.rundir.run_id}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        handler = QuietFileHandler(self.rundir.log_path, delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        return logger

    # --- checkpoint
    def _save_checkpoint(self) -> None:
        trainer_state = self._trainer_state_to_save()
        if trainer_state is not None:
            save_checkpoint(self.rundir.checkpoint_path, self._checkpoint_state(trainer_state))

    # --- hooks (DistributedRun overrides them)
    def _trainer_state_to_save(self) -> dict | None:
        """The trainer state this process saves (None: another process writes the checkpoint)."""
        return self.p.trainer.state_dict()

    def _extra_state(self) -> dict:
        return {}

    def _template_trainer_state(self, trainer_state: dict) -> dict:
        return trainer_state

    def _load_extra_state(self, state: dict) -> None:
        pass

    def _start_fields(self) -> tuple[dict, dict]:
        """Extra fields of the running status and of the start event."""
        return {}, {}

    def _begin_round(self) -> None:
        pass

    def _end_round(self) -> None:
        pass

    def _metric_fields(self, wall: float) -> tuple[int, dict]:
        """bytes_comm and the fields a metric event carries after the metrics."""
        return 0, {}

    def _after_recorded_round(self, verdict, event) -> tuple[str, str] | None:
        """What follows a recorded round: stop with (state, reason), checkpoint, or go on (None)."""
        r = self.p.recipe
        if verdict is not None:
            if verdict[0] == "finished":
                self._save_checkpoint()
                self.final_metrics = event
            return verdict
        if self.signals.received is not None:
            self._save_checkpoint()
            return "killed", f"killed by {signal.Signals(self.signals.received).name}"
        if r.run.checkpoint_every and self.round % r.run.checkpoint_every == 0:
            self._save_checkpoint()
        return None

    def _follow_round(self, t: int, result: RoundResult) -> tuple[str, str] | None:
        """A process that does not record (a rank other than 0) after its part of a round."""
        raise NotImplementedError

    def _share_lambdas(self, lams: list[float] | None) -> list[float]:
        return lams

    def _defer_end_record(self, reason: str) -> bool:
        """True where another process writes the end of the run (a distributed rank that raised)."""
        return False

    def _checkpoint_state(self, trainer_state: dict) -> dict:
        """What checkpoint.pt holds: tensors and plain data only (it is loaded with weights_only=True)."""
        p = self.p
        state = {"round": self.round, "grad_evals": self.grad_evals, "samples": self.samples, "flops": self.flops,
                 "passes": self.passes,
                 "wall_s": self._wall(), "flat": p.params.flat.detach().cpu(),
                 "buffers": [[b.cpu() for b in bs] for bs in p.params.snapshot_buffers()],
                 "trainer": trainer_state, "stoppers": [s.state_dict() for s in self.stoppers],
                 "lams": list(getattr(p.trainer, "lams", []))}
        state.update(self._extra_state())
        augment = augmentation_generator(p.data.train.x)
        state["augment"] = augment.get_state() if augment is not None else None
        return state

    def _checkpoint_template(self) -> dict:
        """The shape of this run's checkpoint, for checking a file before any of it is used."""
        trainer_state = self._template_trainer_state(to_cpu(self.p.trainer.state_dict()))
        template = self._checkpoint_state(trainer_state)
        template["wall_s"] = 0.0
        template["grad_evals"] = 0.0  # flops / one full pass: a number (older checkpoints hold an integer)
        return template

    def _load_checkpoint(self) -> None:
        """Continue from checkpoint.pt: read without running code, check against this run's template, apply
        to the in-memory run, and only then drop the events of rounds after the checkpoint's from the run
        directory. Any problem is a CheckpointError and leaves the directory as it was."""
        state = load_checkpoint(self.rundir.checkpoint_path, self._checkpoint_template())
        rounds = self.p.recipe.run.rounds
        if not 0 <= state["round"] <= rounds:
            raise CheckpointError(f"{self.rundir.checkpoint_path}: holds round {state['round']}, outside this "
                                  f"run's 0..{rounds}; nothing was changed")
        if not (math.isfinite(state["wall_s"]) and state["wall_s"] >= 0):
            raise CheckpointError(f"{self.rundir.checkpoint_path}: wall_s {state['wall_s']} is not a time; "
                                  "nothing was changed")
        try:
            params = self.p.params
            params.flat.copy_(state["flat"])
            params.restore_buffers(state["buffers"])
            self.p.trainer.load_state_dict(state["trainer"])
            for stopper, saved in zip(self.stoppers, state["stoppers"]):
                stopper.load_state_dict(saved)
            augment = augmentation_generator(self.p.data.train.x)
            if augment is not None and state.get("augment") is not None:
                augment.set_state(state["augment"])
            if self.auto_lambda:
                self.p.trainer.lams = [float(x) for x in state["lams"]]
            self._load_extra_state(state)
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise CheckpointError(f"{self.rundir.checkpoint_path}: does not fit this run "
                                  f"({error_line(exc)}); nothing was changed") from None
        self.round, self.grad_evals, self.samples = state["round"], state["grad_evals"], state["samples"]
        self.flops = float(state.get("flops", self.grad_evals * self.flop_table.full))  # older checkpoints
        self.passes = int(state.get("passes", self.grad_evals))
        self.wall_before = float(state["wall_s"])
        if self.leader:
            self.resume_dropped = self.rundir.drop_events_after(self.round)

    def _wall(self) -> float:
        return self.wall_before + (time.perf_counter() - self.t0)

    # --- the loop
    def execute(self, console=None) -> int:
        p, r, rd = self.p, self.p.recipe, self.rundir
        self.t0 = time.perf_counter()
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "") if p.device.type == "cuda" else ""
        extra, start_extra = self._start_fields()
        self.signals.install()
        progress = RoundProgress(None, 0, 0)
        try:
            rd.write_status(state="running", pid=os.getpid(), host=socket.gethostname(), gpu=gpu,
                            started=time.time(), ended=None, exit_code=None, error=None,
                            progress={"round": self.round, "rounds": r.run.rounds}, **extra)
            rd.event("start", run_id=rd.run_id, recipe=r.run.name, n_blocks=p.params.n_blocks,
                     block_sizes=block_sizes(p.model), device=str(p.device), backend=p.backend,
                     mode=r.algorithm.mode, resumed_from_round=self.round if self.round else None,
                     flop_table=self.flop_table.to_dict(), **start_extra)
            self.file_log.info("run %s: %d blocks %s on %s, ops backend %s", rd.run_id, p.params.n_blocks,
                               block_sizes(p.model), p.device, p.backend)
            if getattr(self, "resume_dropped", 0):
                self.file_log.info("resume: dropped %d event lines after the checkpoint's round %d",
                                   self.resume_dropped, self.round)
            progress = progress_for(console, r.run.rounds, self.round)
            state, reason = self._loop(progress)
            exit_code = 0 if state == "finished" else (128 + self.signals.received if state == "killed" else 1)
            error = reason if state == "failed" else None
        except KeyboardInterrupt:  # a second signal (or Ctrl-C outside our handlers): stop now, no checkpoint
            signum = self.signals.second or self.signals.received or signal.SIGINT
            state, exit_code, error = "killed", 128 + signum, None
            reason = f"killed by a second {signal.Signals(signum).name} before the round ended"
        except Exception as exc:  # a failure during the run: the run directory says what happened
            self.file_log.error("%s", traceback.format_exc())
            state, reason, exit_code = "failed", error_line(exc), 1
            error = reason
            self.raised = True
        finally:
            if not self.keeps_signal_handlers:
                self.signals.uninstall()
            progress.close()
        deferred = self.raised and self._defer_end_record(reason)
        self._finalise(state, reason, exit_code, error, deferred)
        self.state, self.reason = state, reason
        return exit_code

    def _finalise(self, state: str, reason: str, exit_code: int, error: str | None, deferred: bool) -> None:
        """The run's last record: end event, arrays, status. Each is tried on its own, so a full disk that
        refuses the event stream still leaves a true status.json (written in place if need be); if even that
        fails, the released lock makes readers show the run as lost."""
        rd, r = self.rundir, self.p.recipe
        steps = [] if deferred else [lambda: rd.event("end", state=state, reason=reason), rd.write_arrays]
        steps.append(lambda: rd.write_status(state=state, ended=time.time(), exit_code=exit_code, error=error,
                                             progress={"round": self.round, "rounds": r.run.rounds}))
        for step in steps:
            try:
                step()
            except OSError as exc:
                self.file_log.error("could not record the end of the run: %s", os_reason(exc))
        self.file_log.info("end: %s (%s)", state, reason)
        rd.close()
        for handler in list(self.file_log.handlers):
            self.file_log.removeHandler(handler)
            handler.close()

    def _loop(self, progress: "RoundProgress") -> tuple[str, str]:
        p, r, rd = self.p, self.p.recipe, self.rundir
        every = r.eval.every
        if self.round == 0 and self.leader:  # units asked for at x_0 (e.g. grad_norm for the theorem's sum)
            for config, unit in p.measurements:
                if config.at_start:
                    self._measure(config.unit, unit.measure, 0)
        while True:
            if self.round >= r.run.rounds:
                return "finished", "rounds done"
            self.round += 1
            t = self.round
            every_lam = r.algorithm.lambda_every
            if self.auto_lambda and (t == 1 or (every_lam and (t - 1) % every_lam == 0)):
                self._measure_lambda(t - 1)
            self._begin_round()
            result: RoundResult = p.trainer.run_round(t)
            note = getattr(p.trainer, "graphs_note", "")  # CUDA graphs used, or why not: once in the run's log
            if note and note != getattr(self, "graphs_said", ""):
                self.graphs_said = note
                self.file_log.info("%s", note)
            self.flops += result.flops
            self.passes += result.grad_evals
            self.samples += result.samples
            self._end_round()
            if not self.leader:
                outcome = self._follow_round(t, result)
                if outcome is not None:
                    return outcome
                continue
            for b in result.blocks:
                fields = vars(b).copy()
                fields["lambda"] = fields.pop("lam")
                rd.event("block", round=t, **fields)
            for config, unit in p.measurements:  # before the metric event, which counts their flops
                if t % config.every == 0:
                    self._measure(config.unit, unit.measure, t)
            metrics = {"train_loss": result.train_loss}
            last_round = t >= r.run.rounds
            if (every and t % every == 0) or last_round:
                metrics.update(self._eval("val"))
            verdict = first_verdict(self.stoppers, metrics, self._wall())
            if verdict is None and last_round:
                verdict = ("finished", "rounds done")
            if verdict is not None and verdict[0] == "finished":
                if "val_loss" not in metrics:
                    metrics.update(self._eval("val"))
                metrics.update(self._eval("test"))
            # grad_evals: flops in full forward+backward passes; a model none of whose operations counts
            # (no matrix product at all) falls back to the passes run
            full = self.flop_table.full
            self.grad_evals = self.flops / full if full > 0 else self.passes
            wall = self._wall()
            bytes_comm, extra_fields = self._metric_fields(wall)
            event = rd.event("metric", round=t, grad_evals=self.grad_evals, flops=self.flops, samples=self.samples,
                             bytes_comm=bytes_comm, wall_s=wall, **metrics, **extra_fields)
            now = time.monotonic()
            if last_round or verdict is not None or now - self._status_at >= STATUS_EVERY_S:
                rd.write_status(progress={"round": t, "rounds": r.run.rounds})
                self._status_at = now
            progress.update(t, metrics, event)
            self.file_log.info("round %d %s", t, " ".join(f"{k} {v:.5g}" for k, v in metrics.items()))
            outcome = self._after_recorded_round(verdict, event)
            if outcome is not None:
                return outcome

    def _context(self, t: int) -> MeasureContext:
        p = self.p
        return MeasureContext(model=p.model, params=p.params, trainer=p.trainer,
                              loss_fn=loss_function(p.data.task), batch=self.measure_batch, device=p.device,
                              round=t, out_dir=self.rundir.path / "measurements",
                              train=(p.data.train.x, p.data.train.y))

    def _measure(self, name: str, fn, t: int) -> dict:
        with count() as work:
            result = fn(self._context(t))
        self.flops += work.flops
        self.rundir.event("measure", unit=name, round=t, **{**result, "flops": work.flops})
        self.file_log.info("measure %s at round %d: %s", name, t,
                           result.get("figure") or str(result.get("value"))[:200])
        return result

    def _measure_lambda(self, t: int) -> None:
        """lambda = "auto": lambda_i = sqrt(n) * max_i Lbar_i from the Hessian block couplings at x_t."""
        lams = None
        if self.leader:  # the leader measures; a distributed run shares its lambdas with every rank
            with count() as work:
                lams, result = auto_lambda(self._context(t), self.lambda_batches)
            self.flops += work.flops
            self.rundir.event("measure", unit="hessian_blocks", round=t, purpose="lambda auto",
                              **{"lambda": lams}, **{**result, "flops": work.flops})
            self.file_log.info("lambda auto at round %d: %s", t, ", ".join(f"{x:.4g}" for x in lams))
        self.p.trainer.lams = self._share_lambdas(lams)

    def _eval(self, split_name: str) -> dict:
        p = self.p
        split = getattr(p.data, split_name)
        result = evaluate(p.model, split, p.data.task, p.recipe.eval.batch_size, p.device)
        self.flops += self.flop_table.forward_samples(len(split))  # evaluation is work the run did too
        return {f"{split_name}_{k}": v for k, v in result.items()}
