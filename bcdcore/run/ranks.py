"""Distributed runs from the run's side: the launcher's validation (`bcdcore run` with nproc > 1) and one rank
of a run, under bcdcore's launcher or an external torchrun; rank 0 writes the run directory.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from bcdcore.recipe import Recipe, RecipeError, load_recipe
from bcdcore.run.console import PlainConsole, error_line, final_summary
from bcdcore.run.distributed_run import DistributedRun
from bcdcore.run.loop import Run
from bcdcore.run.prepare import prepare, resolve_device
from bcdcore.run.start import check_resumable, create_rundir, open_rundir, require_run_directory
from bcdcore.rundir import RunDir


class RankDir:
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
    from bcdcore.plugins import share_sys_path
    from bcdcore.run.distributed import launch

    share_sys_path()  # the ranks are new interpreters: they import plugins from what this process can see
    # This process holds the run's writer lock for the whole launch; rank 0 writes under it (--attach).
    if resume is not None:
        require_run_directory(resume)
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
    from bcdcore.run.distributed import write_rank_error

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

    from bcdcore.run.collective import RoundComm
    from bcdcore.run.distributed import hand_off, init_rank, launched_by_bcdcore, nodes_digest, rank_device

    resuming = resume is not None or attach_resume
    path = attach or resume
    if path is not None:
        recipe = load_recipe(Path(path) / "recipe.toml")
    rank, world, local_rank = init_rank(recipe.distributed)
    recipe.run.device = rank_device(recipe.run.device, local_rank)
    comm = RoundComm(recipe.distributed, resolve_device(recipe.run.device))
    prepared = prepare(recipe, comm)
    made = None
    if path is None:  # several nodes, new run: global rank 0 makes the directory, everyone learns where
        digest = nodes_digest(recipe)
        if rank == 0:
            made = create_rundir(runs_dir, recipe)  # keeps the writer lock for this rank's run
            path = made.path
            if not launched_by_bcdcore():  # else each node's launcher announces it
                announce(f"run directory: {path}")
        path, leader_digest = comm.broadcast_object((str(path), digest) if rank == 0 else None)
        if digest != leader_digest:
            known[0] = path
            hand_off(path)  # this node's launcher reads the failure there
            raise RecipeError(f"rank {rank}: this node's recipe differs from global rank 0's (other file or "
                              "--set values); give every node the same recipe")
    path = Path(path)
    known[0] = path
    hand_off(path)
    if rank != 0:
        rundir = RankDir(path, rank)
    elif made is not None:
        rundir = made
    else:  # under bcdcore's one-host launcher (--attach) the launcher holds the lock; with several nodes
        rundir = open_rundir(path, lock=attach is None)  # (a resume on every node) global rank 0 takes it
    run = DistributedRun(prepared, rundir, comm, resume=bool(resuming))
    console = None
    if rank == 0 and not quiet:  # as `bcdcore run`: a live bar on a terminal, plain lines in a pipe or file
        from rich.console import Console

        console = Console(stderr=True) if sys.stdout.isatty() else PlainConsole(sys.stdout)
    code = run.execute(console)
    if run.raised:
        return 1
    dist.destroy_process_group()
    if rank == 0 and not launched_by_bcdcore():
        announce(final_summary(run.state, run.reason, getattr(run, "final_metrics", None)))
        return code
    return 0  # an orderly end: the launcher reads the state from status.json
