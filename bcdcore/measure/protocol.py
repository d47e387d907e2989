"""Measurement plugins: what a run measures about itself besides the loss.

A measurement is any object with a `name` and a `measure(ctx) -> dict` method (the `Measurement` protocol).
The run calls it every `every` rounds (`[[measure]] unit = ..., every = ...`) with a `MeasureContext` and writes
the returned dict into a `measure` event: `"value"` (a number, a list, or a matrix as a list of rows, unmodified),
an optional `"figure"` (a path relative to the run directory, or absolute) and any further JSON fields.

Built-in units (`BUILTIN`):

- `memory`: bytes held by the training state (parameters, gradients, solver state, the algorithm's buffers,
  the model's buffers) and the process peak (CUDA: `torch.cuda.max_memory_allocated`; CPU: peak RSS).
- `hessian_dense`: the full Hessian of the loss on the fixed measurement batch by central differences of
  autograd gradients, in float64 on an eval-mode deep copy; for small models only (parameter limit).
- `hessian_blocks`: sigma_max(H_ij) for every pair of blocks from matrix-free Hessian-vector products, each
  block's off-diagonal row norm Lbar_i, and a heat map.
- `grad_norm`: ||grad f(x_t)||^2 and f(x_t) of the training objective on a fixed evaluation set (the
  quantities of the convergence theorem), per block too.

Third-party units are given by a dotted path to a class, `"package.module:Class"` or `"package.module.Class"`
(see `load_unit`). `auto_lambda(ctx, batches)` turns `hessian_blocks` measurements, in training mode on a few
training batches, into the per-block lambda of `lambda = "auto"`.

Every unit here leaves the model as it found it: parameters, buffers (BatchNorm statistics), the flat gradient
buffer, train/eval flags and the global random state.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from bcdcore.params import FlatParams

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class MeasureContext:
    model: nn.Module
    params: FlatParams
    trainer: object  # BlockwiseTrainer (anchor, next, solver), EntireTrainer (solver only), or None
    loss_fn: LossFn
    batch: tuple[Tensor, Tensor]  # the fixed measurement batch (the same every time), on the model's device
    device: torch.device
    round: int
    out_dir: Path  # run_dir / "measurements": figures and arrays go here
    train: tuple[Tensor, Tensor] | None = None  # the training split (grad_norm's evaluation set)


@runtime_checkable
class Measurement(Protocol):
    name: str

    def measure(self, ctx: MeasureContext) -> dict: ...


def fixed_batch(x: Tensor, y: Tensor, size: int = 256, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded subset of `size` samples of (x, y) (all of them when there are fewer), in the order drawn:
    the same batch for the same data and seed, without touching the global random state."""
    n = len(x)
    if n <= size:
        if isinstance(x, Tensor):
            return x, y
        idx = torch.arange(n, device=x.device)  # a split kept on disk (bcdcore.image_files): decode it
    else:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].to(x.device)
    return x.index_select(0, idx), y.index_select(0, idx)


def training_batches(x: Tensor, y: Tensor, size: int, count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """`count` disjoint seeded batches of `size` rows of (x, y) (as many as fit; one batch of everything when
    the split holds no more than `size` rows), without touching the global random state."""
    n = len(x)
    if n <= size:
        return [fixed_batch(x, y, size, seed)]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    count = max(1, min(count, n // size))
    out = []
    for k in range(count):
        idx = order[k * size:(k + 1) * size].to(x.device)
        out.append((x.index_select(0, idx), y.index_select(0, idx)))
    return out


# ----------------------------------------------------------------------------------------------------------
# helpers


def nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def relative_path(path: Path, ctx: MeasureContext) -> str:
    """`path` relative to the run directory (the parent of out_dir), else absolute."""
    try:
        return str(path.relative_to(ctx.out_dir.parent))
    except ValueError:
        return str(path.resolve())


def out_dir(ctx: MeasureContext) -> Path:
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


class EvalMode:
    """Puts every module in eval mode (train=True: training mode) and restores each module's own flag
    afterwards."""

    def __init__(self, model: nn.Module, train: bool = False) -> None:
        self.model, self.train = model, train
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.train)

    def __exit__(self, *exc) -> None:
        for m, flag in self.flags:
            m.training = flag


def param_names(model: nn.Module, params: FlatParams) -> list[list[str]]:
    """The model's name of every parameter, per block, in the order of the flat buffer."""
    names = {id(p): name for name, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in ps] for ps in params.block_params]
    except KeyError:
        raise ValueError("the parameter store holds a parameter that is not the model's") from None


def to_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def state_snapshot(model: nn.Module, params: FlatParams) -> tuple[Tensor, Tensor, list[Tensor]]:
    return (params.flat.detach().clone(), params.grad.detach().clone(),
            [b.detach().clone() for b in model.buffers()])


def check_untouched(unit: str, model: nn.Module, params: FlatParams, before) -> None:
    flat, grad, buffers = before
    now = list(model.buffers())
    same = (torch.equal(flat, params.flat) and torch.equal(grad, params.grad) and len(now) == len(buffers)
            and all(torch.equal(a, b) for a, b in zip(buffers, now)))
    if not same:  # a bug in this module, never a user error
        raise RuntimeError(f"{unit}: the measurement changed the model's parameters, gradients or buffers")


# ----------------------------------------------------------------------------------------------------------
# memory


# ----------------------------------------------------------------------------------------------------------
# dense Hessian (small models)


# ----------------------------------------------------------------------------------------------------------
# block couplings (matrix-free)


# ----------------------------------------------------------------------------------------------------------
# the theorem's quantities


# ----------------------------------------------------------------------------------------------------------
# heat maps (matplotlib's object API on an Agg canvas: no pyplot, no global backend switch)


# ----------------------------------------------------------------------------------------------------------
# registry and lambda = "auto"


