"""The `grad_norm` unit: ||grad f(x_t)||^2 and f(x_t) on a fixed evaluation set, in total and per block (the
quantities of the convergence theorem).
"""
from __future__ import annotations

import torch
from torch import Tensor

from bcdcore.measure.protocol import EvalMode, MeasureContext, fixed_batch, param_names


class GradNorm:
    """||grad f(x_t)||^2 and f(x_t), f the training objective (the mean loss) on a fixed evaluation set: the
    quantities of the convergence theorem, (1/T) sum_t ||grad f(x_t)||^2 <= 2 sqrt(n) Lbar_max (f(x_0) - f*) / T.

    The evaluation set is the first `samples` rows (default 8192, so that a large dataset does not cost an epoch
    per measurement) of a seeded permutation of the training split (the same rows at every measurement; the
    whole split when it is smaller, or samples = 0; ctx.batch when the context carries no split), evaluated in
    chunks of `batch_size` rows whose losses and gradients are combined with weights rows / total, so the value
    is that of the mean loss over the whole set. `mode` "eval" (default: BatchNorm running statistics, dropout
    off; f is then one fixed function) or "train" (batch statistics per chunk, on copies of the buffers).
    Gradients are taken by autograd on detached leaves (torch.func.functional_call): the model's parameters,
    gradient buffer and statistics are untouched. value = ||grad f||^2; fields "loss" (f), "block_grad_sq"
    (||grad_i f||^2 per block), "samples".
    """

    name = "grad_norm"

    def __init__(self, samples: int = 8192, batch_size: int = 1024, seed: int = 0, mode: str = "eval") -> None:
        if mode not in ("eval", "train"):
            raise ValueError(f"grad_norm: unknown mode {mode!r}; use 'eval' or 'train'")
        if samples < 0 or batch_size < 1:
            raise ValueError(f"grad_norm: samples must be >= 0 and batch_size >= 1, got {samples}, {batch_size}")
        self.samples, self.batch_size, self.seed, self.mode = int(samples), int(batch_size), int(seed), mode

    def _data(self, ctx: MeasureContext) -> tuple[Tensor, Tensor]:
        if ctx.train is None:
            return ctx.batch
        x, y = ctx.train
        n = len(x) if self.samples == 0 else min(self.samples, len(x))
        return fixed_batch(x, y, n, self.seed) if n < len(x) else (x, y)

    def measure(self, ctx: MeasureContext) -> dict:
        model, params = ctx.model, ctx.params
        names = param_names(model, params)
        leaves = [[p.detach().requires_grad_(True) for p in ps] for ps in params.block_params]
        feed = {name: leaf for bn, bl in zip(names, leaves) for name, leaf in zip(bn, bl)}
        train = self.mode == "train"
        x, y = self._data(ctx)
        total = len(x)
        flat_leaves = [leaf for block in leaves for leaf in block]
        grads = [torch.zeros_like(leaf, dtype=torch.float64) for leaf in flat_leaves]
        loss_sum = 0.0
        devices = [params.flat.device] if params.flat.device.type == "cuda" else []
        with EvalMode(model, train=train), torch.random.fork_rng(devices=devices, enabled=train):
            for start in range(0, total, self.batch_size):
                xb, yb = x[start:start + self.batch_size], y[start:start + self.batch_size]
                chunk = dict(feed)
                if train:  # BatchNorm updates these copies, never the model's statistics
                    chunk.update({name: b.detach().clone() for name, b in model.named_buffers()})
                loss = ctx.loss_fn(torch.func.functional_call(model, chunk, (xb,)), yb) * (len(xb) / total)
                parts = torch.autograd.grad(loss, flat_leaves, allow_unused=True)
                for acc, g in zip(grads, parts):
                    if g is not None:
                        acc += g.to(torch.float64)
                loss_sum += float(loss.detach())
        it = iter(grads)
        block_sq = [sum(float((next(it) ** 2).sum()) for _ in block) for block in leaves]
        return {"value": sum(block_sq), "loss": loss_sum, "block_grad_sq": block_sq, "samples": total,
                "mode": self.mode}
