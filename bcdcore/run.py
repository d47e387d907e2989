"""One run: recipe -> data, model, trainer, stoppers -> run directory.

`prepare` does everything that can fail because of the recipe (it raises RecipeError before any run
directory exists); `Run.execute` trains and records. Exit codes: 0 finished, 1 failed, 128+signal killed.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bcdcore import ops
from bcdcore.algorithm import BlockwiseTrainer, EntireTrainer, RoundResult
from bcdcore.data.batches import BatchStream, eval_batches, stream_seed
from bcdcore.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bcdcore.data import DataBundle, Split, load_data
from bcdcore.data.images import augmentation_generator
from bcdcore.flops import count, count_table
from bcdcore.measure import MeasureContext, auto_lambda, fixed_batch, load_unit, training_batches
from bcdcore.models import block_sizes, build_model
from bcdcore.params import FlatParams
from bcdcore.resources import check_model_fits, is_out_of_memory
from bcdcore.recipe import (CLASSIFICATION, Recipe, RecipeError, check_block_lists, load_recipe, os_reason,
                            per_block, to_toml)
from bcdcore.rundir import RunDir, read_status_checked
from bcdcore.stoppers import build_stoppers, first_verdict

log = logging.getLogger("bcdcore.run")

# distinct seed streams derived from the one run seed
SEED_MODEL, SEED_ACTIVE, SEED_ENTIRE_STREAM = 1, 2, 3


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"run.device = {name!r} but no CUDA device is available here; use \"auto\" or \"cpu\"")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RecipeError(f"run.device = {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def _token_cross_entropy(out, y):
    """Language model: logits (N, T, V) against next tokens (N, T); mean cross-entropy over all tokens."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def loss_function(task: str):
    from bcdcore.recipe import LANGUAGE_MODEL

    if task == CLASSIFICATION:
        return F.cross_entropy
    if task == LANGUAGE_MODEL:
        return _token_cross_entropy
    return lambda out, y: F.mse_loss(out.squeeze(-1), y)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, task: str, batch_size: int, device: torch.device) -> dict:
    """Mean loss, in eval mode, over a split, and the accuracy: of samples for classification, of tokens
    (the share of next tokens predicted exactly) for a language model. A language model's loss is the mean
    token cross-entropy (every window has the same length, so the mean over windows is the mean over tokens)."""
    if len(split) == 0:
        return {}
    from bcdcore.recipe import LANGUAGE_MODEL

    model.eval()
    loss_fn = loss_function(task)
    scored = task in (CLASSIFICATION, LANGUAGE_MODEL)
    total, correct, counted = 0.0, 0, 0
    for xb, yb in eval_batches(split.x, split.y, batch_size):
        xb, yb = xb.to(device), yb.to(device)
        out = model(xb)
        total += loss_fn(out, yb).item() * len(xb)
        if scored:
            correct += (out.argmax(-1) == yb).sum().item()
            counted += yb.numel()
    result = {"loss": total / len(split)}
    if scored:
        result["acc"] = correct / counted
    return result


@dataclass
class Prepared:
    recipe: Recipe
    device: torch.device
    data: DataBundle
    model: nn.Module
    params: FlatParams
    trainer: BlockwiseTrainer | EntireTrainer
    backend: str
    lams: list[float]
    gammas: list[float]
    measurements: list  # (MeasureConfig, Measurement) pairs


def prepare(recipe: Recipe, comm=None) -> Prepared:
    """Build everything a run needs. Recipe problems raise RecipeError; nothing is written to disk.
    `comm` (bcdcore.distributed.Comm) makes the trainer one rank of a distributed run."""
    device = resolve_device(recipe.run.device)
    try:
        data = load_data(recipe.data, recipe.run.seed)
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise RecipeError(f"{recipe.source}: data: {recipe.data.name} does not fit in memory; use fewer "
                          "samples (data.n_samples, data.per_class) or smaller images") from None
    if len(data.train) == 0:
        raise RecipeError(f"{recipe.source}: data: the training split is empty; lower val_fraction/test_fraction")
    check_model_fits(recipe, data.input_shape, data.n_outputs, device)  # before allocating: one line, in GB
    try:
        model = build_model(recipe.model, data.input_shape, data.n_outputs,
                            stream_seed(recipe.run.seed, SEED_MODEL))
    except ValueError as exc:
        raise RecipeError(f"{recipe.source}: model: {exc}") from None
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise RecipeError(f"{recipe.source}: model: {recipe.model.name} does not fit in memory; use smaller "
                          "model.widths") from None
    model.to(device)
    n_blocks = len(model.blocks)
    check_block_lists(recipe, n_blocks)
    # Last of the recipe checks: a fallback notice must not come before a recipe error.
    try:
        backend = ops.resolve_backend(recipe.run.ops_backend, device)
    except ValueError as exc:
        raise RecipeError(f"{recipe.source}: run.ops_backend: {exc}") from None
    measurements = []
    for m in recipe.measure:
        try:
            measurements.append((m, load_unit(m.unit)))
        except ValueError as exc:
            raise RecipeError(f"{recipe.source}: measure.unit: {exc}") from None
    params = FlatParams(model, model.blocks)
    for split in (data.train, data.val, data.test):
        split.x, split.y = split.x.to(device), split.y.to(device)
    a = recipe.algorithm
    lams, gammas = per_block(a.lam, n_blocks), per_block(a.gamma, n_blocks)
    loss_fn = loss_function(data.task)
    seed = recipe.run.seed
    if a.mode == "entire":
        # rank 0 draws the 1-process stream; every other rank its own seeded shard of minibatches
        which = SEED_ENTIRE_STREAM if comm is None or comm.rank == 0 else 1000 + comm.rank
        stream = BatchStream(data.train.x, data.train.y, recipe.data.batch_size, stream_seed(seed, which))
        trainer = EntireTrainer(model, params, loss_fn, stream, a, backend, comm=comm)
    else:
        streams = [BatchStream(data.train.x, data.train.y, recipe.data.batch_size, stream_seed(seed, 100 + i))
                   for i in range(n_blocks)]
        trainer = BlockwiseTrainer(model, params, loss_fn, streams, a, lams, gammas, backend,
                                   stream_seed(seed, SEED_ACTIVE), comm=comm)
    return Prepared(recipe, device, data, model, params, trainer, backend, lams, gammas, measurements)


class _Signals:
    """First SIGTERM/SIGINT: finish the current round, checkpoint, stop. Second: stop at once."""

    def __init__(self, repeat_stops: bool = True) -> None:
        self.received: int | None = None
        self.second: int | None = None  # the signal that cut the round short
        self.previous = {}
        # A rank of a distributed run gets the same signal twice (from the terminal's process group and
        # forwarded by the launcher): there a second signal does not cut the round short.
        self.repeat_stops = repeat_stops

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            if self.repeat_stops:
                self.second = signum
                raise KeyboardInterrupt
            return
        self.received = signum


class _QuietFileHandler(logging.FileHandler):
    """log.txt: a line that cannot be written (a full disk) is lost quietly; logging's default prints a
    traceback to stderr, and the run's status says what happened."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class _RankDir:
    """What a non-zero rank sees of the run directory: its own log file; every write is rank 0's job."""

    def __init__(self, path: Path, rank: int) -> None:
        self.path, self.run_id, self.rank = Path(path), Path(path).name, rank

    @property
    def log_path(self) -> Path:
        return self.path / f"rank{self.rank}.log"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def write_status(self, **fields) -> dict:
        return fields

    def event(self, kind: str, **fields) -> dict:
        return {"kind": kind, **fields}

    def write_arrays(self) -> None:
        pass

    def close(self) -> None:
        pass


class Run:
    def __init__(self, prepared: Prepared, rundir: RunDir, resume: bool = False, comm=None) -> None:
        self.p, self.rundir = prepared, rundir
        self.comm = comm
        self.leader = comm is None or comm.leader
        self.raised = False
        r = prepared.recipe
        self.stoppers = build_stoppers(r.stop, r.run.wall_time_s)
        self.round = 0
        self.grad_evals = self.samples = 0
        self.flops = 0.0  # cumulative FLOPs of every pass (bcdcore.flops); grad_evals = flops / table.full
        self.passes = 0  # forward+backward passes of training
        self.wall_before = 0.0  # wall seconds of earlier sessions of this run (resume)
        self.t0 = time.perf_counter()  # restarted by execute
        self.signals = _Signals(repeat_stops=comm is None)
        if comm is not None:
            comm.local_signal = lambda: self.signals.received or 0
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
        handler = _QuietFileHandler(self.rundir.log_path, delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        return logger

    # --- checkpoint
    def _save_checkpoint(self) -> None:
        p = self.p
        trainer_state = p.trainer.state_dict()
        if self.comm is not None:  # a collective: every rank calls it, rank 0 writes
            states = self.comm.gather_object(_to_cpu(trainer_state))
            if not self.leader:
                return
            trainer_state = p.trainer.merge_states(states)
        save_checkpoint(self.rundir.checkpoint_path, self._checkpoint_state(trainer_state))

    def _checkpoint_state(self, trainer_state: dict) -> dict:
        """What checkpoint.pt holds: tensors and plain data only (it is loaded with weights_only=True)."""
        p = self.p
        state = {"round": self.round, "grad_evals": self.grad_evals, "samples": self.samples, "flops": self.flops,
                 "passes": self.passes,
                 "wall_s": self._wall(), "flat": p.params.flat.detach().cpu(),
                 "buffers": [[b.cpu() for b in bs] for bs in p.params.snapshot_buffers()],
                 "trainer": trainer_state, "stoppers": [s.state_dict() for s in self.stoppers],
                 "lams": list(getattr(p.trainer, "lams", []))}
        if self.comm is not None:
            state["comm"] = self.comm.state_dict()
        augment = augmentation_generator(p.data.train.x)
        state["augment"] = augment.get_state() if augment is not None else None
        return state

    def _checkpoint_template(self) -> dict:
        """The shape of this run's checkpoint, for checking a file before any of it is used."""
        trainer_state = _to_cpu(self.p.trainer.state_dict())
        if self.comm is not None and "stream" in trainer_state:
            trainer_state["rank_streams"] = [trainer_state["stream"]] * self.comm.world
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
            if self.comm is not None and state.get("comm") is not None:  # older checkpoints lack it
                self.comm.load_state_dict(state["comm"])
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
        extra, start_extra = {}, {}
        if self.comm is not None:
            from bcdcore.distributed import launched_by_bcdcore, write_rank_file

            write_rank_file(rd.path, self.comm.rank, "pid", f"{os.getpid()}\n")
            extra = {"world_size": self.comm.world,
                     "launcher_pid": os.getppid() if launched_by_bcdcore() else None}
            start_extra = {"world_size": self.comm.world, "dist_backend": r.distributed.backend}
            if r.algorithm.mode == "blockwise":
                start_extra["block_owner"] = list(self.comm.owner)
        self.signals.install()
        progress = _Progress(None, 0, 0)
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
            progress = _Progress(console, r.run.rounds, self.round)
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
            if self.comm is None:  # a rank keeps its handlers: the launcher's teardown SIGTERM must not cut
                self.signals.uninstall()  # the final record short
            progress.close()
        deferred = False
        if self.comm is not None and self.raised:
            from bcdcore.distributed import launched_by_bcdcore, write_rank_error

            write_rank_error(rd.path, self.comm.rank, reason)  # the traceback is in the log already
            deferred = launched_by_bcdcore()  # the launcher names the rank that failed first and ends the record
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

    def _loop(self, progress: "_Progress") -> tuple[str, str]:
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
            if self.comm is not None:
                self.comm.begin_round()
            result: RoundResult = p.trainer.run_round(t)
            self.flops += result.flops
            self.passes += result.grad_evals
            self.samples += result.samples
            if self.comm is not None:
                self.comm.end_round()
                if not self.leader:
                    self.file_log.info("round %d train_loss %.5g", t, result.train_loss)
                    outcome = self._decide(None, None)
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
            if self.comm is None:
                event = rd.event("metric", round=t, grad_evals=self.grad_evals, flops=self.flops,
                                 samples=self.samples, bytes_comm=0, wall_s=self._wall(), **metrics)
            else:
                wall = self._wall()
                event = rd.event("metric", round=t, grad_evals=self.grad_evals, flops=self.flops,
                                 samples=self.samples, bytes_comm=self.comm.bytes_total, wall_s=wall, **metrics,
                                 **self.comm.metrics(wall))
            rd.write_status(progress={"round": t, "rounds": r.run.rounds})
            progress.update(t, metrics)
            self.file_log.info("round %d %s", t, " ".join(f"{k} {v:.5g}" for k, v in metrics.items()))
            if self.comm is not None:
                outcome = self._decide(verdict, event)
                if outcome is not None:
                    return outcome
                continue
            if verdict is not None:
                if verdict[0] == "finished":
                    self._save_checkpoint()
                    self.final_metrics = event
                return verdict
            if self.signals.received is not None:
                self._save_checkpoint()
                name = signal.Signals(self.signals.received).name
                return "killed", f"killed by {name}"
            if r.run.checkpoint_every and t % r.run.checkpoint_every == 0:
                self._save_checkpoint()

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
        if self.comm is not None:  # rank 0 measures, every rank gets its lambdas
            lams = None
            if self.leader:
                with count() as work:
                    lams, result = auto_lambda(self._context(t), self.lambda_batches)
                self.flops += work.flops
                self.rundir.event("measure", unit="hessian_blocks", round=t, purpose="lambda auto",
                                  **{"lambda": lams}, **{**result, "flops": work.flops})
            self.p.trainer.lams = self.comm.broadcast_object(lams)
            return
        with count() as work:
            lams, result = auto_lambda(self._context(t), self.lambda_batches)
        self.flops += work.flops
        self.p.trainer.lams = lams
        self.rundir.event("measure", unit="hessian_blocks", round=t, purpose="lambda auto", **{"lambda": lams},
                          **{**result, "flops": work.flops})
        self.file_log.info("lambda auto at round %d: %s", t, ", ".join(f"{x:.4g}" for x in lams))

    def _eval(self, split_name: str) -> dict:
        p = self.p
        split = getattr(p.data, split_name)
        result = evaluate(p.model, split, p.data.task, p.recipe.eval.batch_size, p.device)
        self.flops += self.flop_table.forward_samples(len(split))  # evaluation is work the run did too
        return {f"{split_name}_{k}": v for k, v in result.items()}


class _Progress:
    """Rich progress bar on the console: round, loss, val metric, ETA."""

    def __init__(self, console, rounds: int, done: int) -> None:
        self.bar = None
        if console is None:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("round {task.completed}/{task.total}"), BarColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                            transient=False)
        self.task = self.bar.add_task("train", total=rounds, completed=done, info="")
        self.bar.start()

    def update(self, t: int, metrics: dict) -> None:
        if self.bar is None:
            return
        info = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith("test_"))
        self.bar.update(self.task, completed=t, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def start_run(recipe: Recipe, runs_dir: Path) -> Run:
    """Validate and build everything first (nothing is written before that passes), then create the run
    directory, which holds the writer lock until the run ends."""
    prepared = prepare(recipe)
    rundir = create_rundir(runs_dir, recipe)
    try:
        return Run(prepared, rundir)
    except BaseException as exc:  # Ctrl-C or a fault before the loop: the run must not stay "queued"
        _abandon(rundir, exc)
        raise


def create_rundir(runs_dir: Path, recipe: Recipe) -> RunDir:
    """The new run's directory; a runs directory that cannot take it is a RecipeError naming why."""
    try:
        return RunDir.create(runs_dir, recipe.run.name, recipe.digest(), to_toml(recipe.to_dict()))
    except OSError as exc:
        raise RecipeError(f"cannot create a run directory under {runs_dir}: {os_reason(exc)}; "
                          "pass --runs-dir DIR or set $BCD_RUNS to a writable folder") from None


def _abandon(rundir: RunDir, exc: BaseException) -> None:
    state = "killed" if isinstance(exc, KeyboardInterrupt) else "failed"
    try:
        rundir.write_status(state=state, ended=time.time(), exit_code=130 if state == "killed" else 1,
                            error=None if state == "killed" else error_line(exc))
    except OSError:
        pass
    rundir.close()


def resume_run(run_path: Path) -> Run:
    """Take the run's writer lock first (a second `--resume` is refused naming the holder), then check it can
    continue and load its checkpoint; on any refusal the lock is released and nothing has changed."""
    run_path = Path(run_path)
    if not run_path.is_dir():
        raise RecipeError(f"{run_path}: not a run directory; pass runs/<run id>")
    check_resumable(run_path)  # before the lock: a folder that is no run gets no lock file
    rundir = open_rundir(run_path)
    try:
        check_resumable(run_path)  # again under the lock: another writer may have just ended it
        recipe = load_recipe(run_path / "recipe.toml")
        return Run(prepare(recipe), rundir, resume=True)
    except BaseException:
        rundir.close()
        raise


def open_rundir(run_path: Path, lock: bool = True) -> RunDir:
    try:
        return RunDir.open(run_path, lock=lock)
    except OSError as exc:
        raise RecipeError(f"{run_path}: cannot write to the run directory: {os_reason(exc)}") from None


def _alive(status: dict) -> bool:
    from bcdcore.rundir import pid_alive
    return status.get("host") == socket.gethostname() and pid_alive(status.get("pid"))


def final_summary(run: Run) -> str:
    m = getattr(run, "final_metrics", None) or {}
    parts = [f"{k} {m[k]:.4f}" for k in ("test_acc", "test_loss", "val_acc", "val_loss") if
             isinstance(m.get(k), (int, float)) and math.isfinite(m[k])]
    return f"{run.state}: {run.reason}" + (f"  |  {'  '.join(parts)}" if parts else "")


def error_line(exc: BaseException) -> str:
    """One line for status.json and the end event: the exception's type and the first line of its message
    (the whole traceback goes to the log)."""
    if isinstance(exc, OSError) and exc.strerror:
        return os_reason(exc)  # e.g. "no space left on device: runs/x/metrics.jsonl"
    if is_out_of_memory(exc):
        return f"out of memory ({type(exc).__name__}); use a smaller model, batch_size or dataset"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"error: {type(exc).__name__}: {lines[0]}" if lines else f"error: {type(exc).__name__}"


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------------------------------------
# distributed runs

def check_resumable(run_path: Path) -> Path:
    """The run directory, if --resume may continue it; else a RecipeError saying why not."""
    run_path = Path(run_path)
    status, problem = read_status_checked(run_path)
    if problem:
        if not (run_path / "status.json").exists() and not (run_path / "metrics.jsonl").exists():
            raise RecipeError(f"{run_path}: not a run directory (no status.json)")
        raise RecipeError(f"{run_path}: cannot resume: {problem}")
    if status.get("state") == "finished":
        raise RecipeError(f"{run_path}: the run already finished; start a new run instead of --resume")
    if status.get("state") == "running" and _alive(status):
        raise RecipeError(f"{run_path}: the run is still running (pid {status.get('pid')})")
    if not (run_path / "checkpoint.pt").is_file():
        raise RecipeError(f"{run_path}: no checkpoint.pt to resume from")
    return run_path


def validate(recipe: Recipe, resume: RunDir | None = None) -> None:
    """The launcher's check before it creates a run directory: everything `prepare` checks, on the CPU (the
    launcher holds no GPU memory while the ranks run). With `resume`, the checkpoint is checked too (and the
    events after its round dropped), so a bad one is refused before any rank starts."""
    import copy
    import gc

    resolve_device(recipe.run.device)
    check = copy.deepcopy(recipe)
    check.run.device = "cpu"
    if check.run.ops_backend == "cuda":
        check.run.ops_backend = "auto"
    prepared = prepare(check)
    if resume is not None:
        run = Run(prepared, resume, resume=True)
        for handler in list(run.file_log.handlers):
            run.file_log.removeHandler(handler)
            handler.close()
        del run
    del prepared
    gc.collect()


def launch_distributed(recipe: Recipe | None, runs_dir: Path | None, resume: Path | None, quiet: bool,
                       announce) -> int:
    """`bcdcore run` with nproc > 1: validate, create (or reopen) the run directory, start the ranks under
    torchrun's agent, wait, and make sure the run directory ends with a final state."""
    from bcdcore.distributed import launch

    # This process holds the run's writer lock for the whole launch; rank 0 writes under it (--attach).
    if resume is not None:
        check_resumable(resume)
        rundir = open_rundir(Path(resume))
        try:
            path = check_resumable(resume)
            recipe = load_recipe(path / "recipe.toml")
            validate(recipe, rundir)
        except BaseException:
            rundir.close()
            raise
    else:
        validate(recipe)
        rundir = create_rundir(runs_dir, recipe)
        path = rundir.path
    try:
        rundir.close_streams()
        announce(f"run directory: {path}")
        code, summary = launch(path, recipe.distributed.nproc, recipe.distributed, resume is not None, quiet)
        announce(summary)
    finally:
        rundir.close()
    return code


def run_rank(attach: Path | None, attach_resume: bool, recipe: Recipe | None, runs_dir: Path | None,
             resume: Path | None, quiet: bool, announce) -> int:
    """One rank of a distributed run: attached to the run directory the bcdcore launcher made (`attach`),
    or under an external torchrun (multi-node), where rank 0 creates the run directory itself."""
    from bcdcore.distributed import write_rank_error

    known = [attach or resume]  # the run directory once this rank knows it
    try:
        return _run_rank(attach, attach_resume, recipe, runs_dir, resume, quiet, announce, known)
    except Exception as exc:
        # Raised outside Run.execute (joining the group, building the model or data, loading the
        # checkpoint): without rankN.error the launcher would blame the rank that failed next, whose
        # collective broke because this one left.
        if known[0] is not None:
            write_rank_error(Path(known[0]), int(os.environ.get("RANK", "0")), error_line(exc),
                             traceback.format_exc())
        raise


def _run_rank(attach: Path | None, attach_resume: bool, recipe: Recipe | None, runs_dir: Path | None,
              resume: Path | None, quiet: bool, announce, known: list) -> int:
    import torch.distributed as dist

    from bcdcore.distributed import Comm, init_rank, launched_by_bcdcore, rank_device

    resuming = resume is not None or attach_resume
    path = attach or resume
    if path is not None:
        recipe = load_recipe(Path(path) / "recipe.toml")
    rank, world, local_rank = init_rank(recipe.distributed)
    recipe.run.device = rank_device(recipe.run.device, local_rank)
    comm = Comm(recipe.distributed, resolve_device(recipe.run.device))
    prepared = prepare(recipe, comm)
    made = None
    if path is None:  # external torchrun, new run: rank 0 makes the directory, everyone learns where
        if rank == 0:
            made = create_rundir(runs_dir, recipe)  # keeps the writer lock for this rank's run
            path = made.path
            announce(f"run directory: {path}")
        path = comm.broadcast_object(str(path) if path else None)
    path = Path(path)
    known[0] = path
    if rank != 0:
        rundir = _RankDir(path, rank)
    elif made is not None:
        rundir = made
    else:  # under bcdcore's launcher (--attach) the launcher holds the lock; under an external torchrun,
        rundir = open_rundir(path, lock=attach is None)  # rank 0 takes it
    run = Run(prepared, rundir, resume=bool(resuming), comm=comm)
    console = None
    if rank == 0 and not quiet:
        from rich.console import Console
        console = Console(stderr=True)
    code = run.execute(console)
    if run.raised:
        return 1
    dist.destroy_process_group()
    if rank == 0 and not launched_by_bcdcore():
        announce(final_summary(run))
        return code
    return 0  # an orderly end: the launcher reads the state from status.json
