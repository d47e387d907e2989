"""Compute accounting: the FLOPs of every pass a run makes (docs/algorithm.md, "Compute accounting").

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`: the matrix products and convolutions
(mm, addmm, bmm, baddbmm, convolution forward and backward, scaled-dot-product attention) that torch
dispatches, 2 FLOPs per multiply-add; matrix-vector and vector products (mv, dot: a linear model with one
output) are added here, which torch leaves out. Elementwise work (activations, normalisation, the fused update) is not
counted: it is a few FLOPs per element against hundreds per weight for every layer with weights, and the
convention is the one torch and the literature use.

Once at the start of a run, on one minibatch of the training batch size, in training mode:

- `forward`: one forward pass of the whole model (every inner step runs all of it, whatever block is solved);
- `backward[i]`: the backward pass with only block i trainable, as the algorithm runs it (gradients of block
  i's parameters and the input gradients of every layer between the loss and block i; nothing upstream);
- `full_backward`: the backward with every block trainable (`entire` mode).

A blockwise inner step on block i costs forward + backward[i]; an `entire` step forward + full_backward, the
unit of `grad_evals` (grad_evals = flops / (forward + full_backward)). Evaluation costs forward per sample
times the samples evaluated. Measurements and lambda = "auto" are counted as they run (`count`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from bcdcore.params import FlatParams

LossFn = Callable[[Tensor, Tensor], Tensor]
aten = torch.ops.aten


def _mv_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    m, k = a_shape
    return 2 * m * k


def _dot_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0]


EXTRA_FORMULAS = {aten.mv: _mv_flop, aten.dot: _dot_flop}


@dataclass
class FlopTable:
    forward: float  # one training-mode forward on one minibatch
    backward: list[float]  # per block: the backward with only that block trainable
    full_backward: float  # the backward with every block trainable
    batch_size: int  # rows of the minibatch counted

    @property
    def full(self) -> float:
        """One full forward + backward on one minibatch: the unit of grad_evals."""
        return self.forward + self.full_backward

    def block_pass(self, i: int) -> float:
        """One inner step of block i: the forward and block i's partial backward."""
        return self.forward + self.backward[i]

    def forward_samples(self, n: int) -> float:
        """Forward passes over n samples (evaluation): linear in the rows of a batch."""
        return self.forward * n / self.batch_size

    def to_dict(self) -> dict:
        return {"forward": self.forward, "backward": list(self.backward), "full_backward": self.full_backward,
                "batch_size": self.batch_size}


class Counter:
    """The FLOPs of whatever runs inside `with counter:` (any device, autograd included)."""

    def __init__(self) -> None:
        self.flops = 0.0
        self._mode: FlopCounterMode | None = None

    def __enter__(self) -> "Counter":
        self._mode = FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        mode, self._mode = self._mode, None
        mode.__exit__(*exc)
        self.flops += float(mode.get_total_flops())


@contextmanager
def count() -> Iterator[Counter]:
    """`with count() as c: ...` then c.flops."""
    with Counter() as c:
        yield c


def count_table(model: nn.Module, params: FlatParams, loss_fn: LossFn, batch: tuple[Tensor, Tensor]) -> FlopTable:
    """The FlopTable of `model` on `batch`, leaving parameters, gradients, buffers, train/eval flags,
    trainable flags and the global random state (dropout) as they were."""
    x, y = batch
    flags = [(m, m.training) for m in model.modules()]
    buffers = params.snapshot_buffers()
    grad = params.grad.detach().clone()
    devices = [params.flat.device] if params.flat.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            with count() as fwd:
                loss_fn(model(x), y)
            backward = []
            for blocks in [{i} for i in range(params.n_blocks)] + [None]:
                params.set_trainable(blocks)
                loss = loss_fn(model(x), y)
                with count() as bwd:
                    loss.backward()
                backward.append(bwd.flops)
    finally:
        params.set_trainable(None)
        params.grad.copy_(grad)
        params.restore_buffers(buffers)
        for m, flag in flags:
            m.training = flag
    return FlopTable(forward=fwd.flops, backward=backward[:-1], full_backward=backward[-1], batch_size=len(x))
