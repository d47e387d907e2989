"""The `memory` unit: parameter, gradient, solver-state and buffer bytes, and the process's peak RSS.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from bcdcore.measure.protocol import MeasureContext, nbytes


class MemoryUsage:
    """Bytes of the training state, by part, and the process peak.

    Parts (each numel * element_size of the tensors named): `parameters` (the flat parameter buffer),
    `gradients` (the flat gradient buffer), `solver_state` (the solver's flat state buffers: none for sgd, one
    for momentum, two for Adam; a torch optimizer's tensor state when a trainer has `optimizer` instead),
    `algorithm_buffers` (the trainer's `anchor` and `next`; `next` exists for Jacobi only) and `model_buffers`
    (BatchNorm statistics and other module buffers). value = their sum. The peak is `peak_bytes`:
    `torch.cuda.max_memory_allocated` on a CUDA device (`peak_source` = "cuda_max_memory_allocated"), else the
    peak resident set size of this process (`peak_source` = "ru_maxrss"; kilobytes on Linux, bytes on macOS).
    """

    name = "memory"

    def measure(self, ctx: MeasureContext) -> dict:
        trainer = ctx.trainer
        solver = getattr(trainer, "solver", None)
        state = [t for t in getattr(solver, "state", []) or [] if isinstance(t, Tensor)]
        optimizer = getattr(trainer, "optimizer", None)
        if isinstance(optimizer, torch.optim.Optimizer):
            state += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
        algorithm = [getattr(trainer, name, None) for name in ("anchor", "next")]
        parts = {
            "parameters": nbytes(ctx.params.flat),
            "gradients": nbytes(ctx.params.grad),
            "solver_state": sum(nbytes(t) for t in state),
            "algorithm_buffers": sum(nbytes(t) for t in algorithm if isinstance(t, Tensor)),
            "model_buffers": sum(nbytes(b) for b in ctx.model.buffers()),
        }
        result: dict = {"value": sum(parts.values()), **parts, "n_params": ctx.params.flat.numel()}
        device = torch.device(ctx.device)
        if device.type == "cuda" and torch.cuda.is_available():
            result["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
            result["peak_source"] = "cuda_max_memory_allocated"
        else:
            result["peak_bytes"] = peak_rss()
            result["peak_source"] = "ru_maxrss"
        return result


def peak_rss() -> int | None:
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
