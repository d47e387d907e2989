"""Measurement units: what a run measures about itself besides the loss (protocol and registry, memory,
Hessians and their block couplings with the linear algebra behind them, gradient norms, heat maps), and the
measurement behind `lambda = "auto"`. Third-party units are classes named by dotted path (`load_unit`)."""
from bcdcore.measure.gradnorm import GradNorm
from bcdcore.measure.hessian import HessianBlocks, HessianDense, auto_lambda
from bcdcore.measure.linalg import block_sigma_max
from bcdcore.measure.memory import MemoryUsage
from bcdcore.measure.protocol import MeasureContext, Measurement, fixed_batch, training_batches
from bcdcore.measure.registry import BUILTIN, load_unit

__all__ = ["GradNorm", "HessianBlocks", "HessianDense", "auto_lambda", "block_sigma_max", "MemoryUsage",
           "MeasureContext", "Measurement", "fixed_batch", "training_batches", "BUILTIN", "load_unit"]
