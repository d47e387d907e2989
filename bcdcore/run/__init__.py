"""One run: recipe -> prepare (data, model, trainer) -> the loop -> the run directory.

prepare: build and validate; loop: `Run`, Algorithm 1's rounds with evaluation, measurements, stoppers and
checkpoints; start: new runs and resumes; console: progress and one-line messages; signals; distributed (the
communicator and torchrun's launcher) and ranks (the run side of distributed runs).
"""
from bcdcore.run.console import error_line, final_summary
from bcdcore.run.loop import Run
from bcdcore.run.prepare import Prepared, evaluate, loss_function, prepare, resolve_device
from bcdcore.run.ranks import launch_distributed, run_rank, validate
from bcdcore.run.start import check_resumable, resume_run, start_run

__all__ = ["error_line", "final_summary", "Run", "Prepared", "evaluate", "loss_function", "prepare",
           "resolve_device", "launch_distributed", "run_rank", "validate", "check_resumable", "resume_run",
           "start_run"]
