"""Hessians of the training loss: `hessian_dense` (float64, small models), `hessian_blocks` (matrix-free
Hessian-vector products, the largest singular value of every block pair, with restart checks), and the measurement
behind `lambda = "auto"` (lambda_i = sqrt(n) max Lbar, in training mode on several batches).
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch
from torch import Tensor, nn

from bcdcore.measure.heatmap import heatmap
from bcdcore.measure.linalg import block_sigma_max
from bcdcore.measure.protocol import (
    EvalMode,
    LossFn,
    MeasureContext,
    check_untouched,
    out_dir,
    param_names,
    relative_path,
    state_snapshot,
    to_dtype,
)
from bcdcore.params import FlatParams


class HessianDense:
    """The full Hessian of loss(model(x), y) on the fixed batch w.r.t. all parameters, in flat-buffer order
    (block after block), for small models only.

    Computed on a deep copy of the model converted to float64 and put in eval mode (so dropout is off and
    BatchNorm uses, and never updates, its running statistics): column k is the central difference
    (g(x + h_k e_k) - g(x - h_k e_k)) / (2 h_k) of autograd gradients with h_k = eps^(1/3) * max(1, |x_k|),
    and the result is symmetrised, H = (H + H^T) / 2. Above `max_params` parameters it refuses with a ValueError
    (2 * n gradient evaluations and an n x n matrix in the event stream). value = the matrix; it is also saved
    as `hessian_dense_r{round}.npy` (field "array") and drawn as a heat map with the block boundaries
    (field "figure").
    """

    name = "hessian_dense"

    def __init__(self, max_params: int = 300) -> None:
        self.max_params = int(max_params)

    def measure(self, ctx: MeasureContext) -> dict:
        model, params = ctx.model, ctx.params
        n = params.flat.numel()
        if n > self.max_params:
            raise ValueError(f"hessian_dense: the model has {n} parameters, above the limit of {self.max_params}; "
                             f"use hessian_blocks (matrix-free) for larger models")
        before = state_snapshot(model, params)
        names = [name for block in param_names(model, params) for name in block]
        work = copy.deepcopy(model).double().eval()
        leaves = [work.get_parameter(name) for name in names]
        for p in work.parameters():
            p.requires_grad_(False)
        for p in leaves:
            p.requires_grad_(True)
        x, y = (to_dtype(t, torch.float64) for t in ctx.batch)

        def gradient() -> Tensor:
            loss = ctx.loss_fn(work(x), y)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(leaves, grads)])

        eps3 = torch.finfo(torch.float64).eps ** (1.0 / 3.0)
        hess = torch.empty(n, n, dtype=torch.float64, device=params.flat.device)
        k = 0
        for p in leaves:
            flat_p = p.data.view(-1)
            for j in range(flat_p.numel()):
                x0 = flat_p[j].item()
                h = eps3 * max(1.0, abs(x0))
                with torch.no_grad():
                    flat_p[j] = x0 + h
                    up_step = flat_p[j].item() - x0  # the step actually taken (rounding)
                g_plus = gradient()
                with torch.no_grad():
                    flat_p[j] = x0 - h
                    down_step = x0 - flat_p[j].item()
                g_minus = gradient()
                with torch.no_grad():
                    flat_p[j] = x0
                hess[:, k] = (g_plus - g_minus) / (up_step + down_step)
                k += 1
        hess = 0.5 * (hess + hess.T)
        del work
        check_untouched(self.name, model, params, before)

        matrix = hess.cpu().numpy()
        out = out_dir(ctx)
        array_path = out / f"hessian_dense_r{ctx.round}.npy"
        np.save(array_path, matrix)
        figure_path = out / f"hessian_dense_r{ctx.round}.png"
        heatmap(np.abs(matrix), figure_path, f"|H| (dense, {n} parameters), round {ctx.round}",
                 boundaries=params.offsets[1:-1], annotate=False, label="$|H_{kl}|$", axis="parameter")
        return {"value": matrix.tolist(), "array": relative_path(array_path, ctx), "figure": relative_path(figure_path, ctx),
                "n_params": n, "block_offsets": list(params.offsets)}


class HVP:
    """Matrix-free products with blocks of the Hessian of loss(batch) at the current parameters, eval mode.

    The gradient g is taken once with create_graph=True; H_ij v (v in block j's coordinates, result in block
    i's) is then one double backward: the gradient w.r.t. block i's parameters of <g_j, v>. The model's own
    parameters are never written: the forward pass runs through torch.func.functional_call on detached leaves
    (sharing storage when no dtype change is asked for).
    """

    def __init__(self, model: nn.Module, params: FlatParams, loss_fn: LossFn, batch: tuple[Tensor, Tensor],
                 dtype: torch.dtype, own_buffers: bool = False) -> None:
        names = param_names(model, params)
        self.leaves: list[list[Tensor]] = []
        feed: dict[str, Tensor] = {}
        for block_names, block_params in zip(names, params.block_params):
            leaves = []
            for name, p in zip(block_names, block_params):
                leaf = p.detach() if p.dtype == dtype else p.detach().to(dtype)
                leaf.requires_grad_(True)
                leaves.append(leaf)
                feed[name] = leaf
            self.leaves.append(leaves)
        if params.flat.dtype != dtype or own_buffers:
            # Training mode updates BatchNorm statistics in place: it updates these copies, never the model's.
            for name, b in model.named_buffers():
                feed[name] = to_dtype(b.detach(), dtype).clone()
        x, y = (to_dtype(t, dtype) for t in batch)
        all_leaves = [leaf for block in self.leaves for leaf in block]
        loss = loss_fn(torch.func.functional_call(model, feed, (x,)), y)
        self.loss = float(loss.detach())
        grads = torch.autograd.grad(loss, all_leaves, create_graph=True, allow_unused=True)
        it = iter(grads)
        self.grads = [[next(it) for _ in block] for block in self.leaves]
        self.sizes = [sum(leaf.numel() for leaf in block) for block in self.leaves]
        self.dtype, self.device = dtype, params.flat.device
        self.products = 0

    def apply(self, i: int, j: int, v: Tensor) -> Tensor:
        """H_ij v for a flat vector v of block j's size; a flat vector of block i's size."""
        self.products += 1
        dot = None
        offset = 0
        for g, leaf in zip(self.grads[j], self.leaves[j]):
            n = leaf.numel()
            if g is not None and g.requires_grad:
                term = (g.reshape(-1) * v[offset:offset + n]).sum()
                dot = term if dot is None else dot + term
            offset += n
        out = torch.zeros(self.sizes[i], dtype=self.dtype, device=self.device)
        if dot is None:  # the gradient of block j does not depend on any parameter: H_:j = 0
            return out
        hv = torch.autograd.grad(dot, self.leaves[i], retain_graph=True, allow_unused=True)
        offset = 0
        for h, leaf in zip(hv, self.leaves[i]):
            n = leaf.numel()
            if h is not None:
                out[offset:offset + n] = h.reshape(-1)
            offset += n
        return out


class HessianBlocks:
    """Couplings between blocks: sigma_max(H_ij) for every pair of blocks i, j (i == j included), where H_ij is
    the block of the Hessian of loss(model(x), y) on the fixed measurement batch with rows in block i's and
    columns in block j's parameters, and each block's off-diagonal row norm

        Lbar_i = sqrt( sum_{j != i} sigma_max(H_ij)^2 ),

    the size of block i's coupling to all other blocks (zero for a single block).

    Matrix-free: Hessian-vector products by double backward (torch.autograd.grad with create_graph), on
    detached leaves that share the parameters' storage, so parameters, gradients, buffers and train/eval flags
    are as before. `mode` "eval" (default): dropout off, BatchNorm uses its running statistics; "train": the
    training objective's semantics, BatchNorm normalises with the batch's statistics (it updates copies of the
    buffers, never the model's) and dropout draws its masks under a forked global random state.
    sigma_max by Golub-Kahan-Lanczos with a deflated restart check (default) or power iteration on
    H_ij^T H_ij (see `block_sigma_max`), from random start vectors drawn from a torch.Generator seeded by
    `seed` and the round (a new start every measurement, reproducible; never the global random state), to
    relative tolerance `tol` or `max_iter` iterations. H is symmetric, so H_ji = H_ij^T and sigma(H_ji) = sigma(H_ij): only
    pairs i <= j are computed. `dtype` None computes in the parameters' dtype (fp16/bf16 in float32);
    torch.float64 makes a float64 copy of the parameters for accuracy on small models.

    value = the n x n matrix of sigma_max (symmetric); fields: "row_norms" (Lbar), "iterations" (per pair),
    "converged" (all pairs within tol), "hvp" (Hessian-vector products used), "loss", "block_sizes",
    "figure" (heat map `hessian_blocks_r{round}.png`, cells annotated) and "array" (the matrix as .npy).
    """

    name = "hessian_blocks"

    def __init__(self, tol: float = 1e-4, max_iter: int | None = None, method: str = "lanczos", seed: int = 0,
                 dtype: torch.dtype | None = None, figure: bool = True, mode: str = "eval") -> None:
        if method not in ("lanczos", "power"):
            raise ValueError(f"hessian_blocks: unknown method {method!r}; use 'lanczos' or 'power'")
        if mode not in ("eval", "train"):
            raise ValueError(f"hessian_blocks: unknown mode {mode!r}; use 'eval' or 'train'")
        self.mode = mode
        if not tol > 0:
            raise ValueError(f"hessian_blocks: tol must be > 0, got {tol}")
        self.tol, self.max_iter, self.method, self.seed = float(tol), max_iter, method, int(seed)
        self.dtype, self.figure = dtype, figure

    def _dtype(self, params: FlatParams) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        flat = params.flat.dtype
        return torch.float32 if flat in (torch.float16, torch.bfloat16) else flat

    def measure(self, ctx: MeasureContext) -> dict:
        model, params = ctx.model, ctx.params
        buffers = [b.detach().clone() for b in model.buffers()]  # cheap; parameters are never written here
        dtype = self._dtype(params)
        train = self.mode == "train"
        devices = [params.flat.device] if params.flat.device.type == "cuda" else []
        with EvalMode(model, train=train), torch.random.fork_rng(devices=devices, enabled=train):
            hvp = HVP(model, params, ctx.loss_fn, ctx.batch, dtype, own_buffers=train)
            n = params.n_blocks
            sigma = np.zeros((n, n))
            iterations = np.zeros((n, n), dtype=int)
            converged = True
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(ctx.round))
            for i in range(n):
                for j in range(i, n):
                    s, its, ok = block_sigma_max(
                        lambda v, i=i, j=j: hvp.apply(i, j, v), lambda u, i=i, j=j: hvp.apply(j, i, u),
                        hvp.sizes[j], hvp.sizes[i], generator=generator, dtype=dtype, device=hvp.device,
                        method=self.method, tol=self.tol, max_iter=self.max_iter)
                    sigma[i, j] = sigma[j, i] = s
                    iterations[i, j] = iterations[j, i] = its
                    converged = converged and ok
            loss, products = hvp.loss, hvp.products
            del hvp
        if not all(torch.equal(a, b) for a, b in zip(buffers, model.buffers())):  # a bug here, not a user error
            raise RuntimeError(f"{self.name}: the measurement changed the model's buffers")

        off = sigma.copy()
        np.fill_diagonal(off, 0.0)
        row_norms = np.sqrt((off ** 2).sum(axis=1))
        result: dict = {"value": sigma.tolist(), "row_norms": row_norms.tolist(),
                        "iterations": iterations.tolist(), "converged": bool(converged), "hvp": products,
                        "loss": loss, "block_sizes": list(params.sizes), "method": self.method, "tol": self.tol,
                        "mode": self.mode, "batch_rows": len(ctx.batch[0])}
        if self.figure:
            out = out_dir(ctx)
            array_path = out / f"hessian_blocks_r{ctx.round}.npy"
            np.save(array_path, sigma)
            figure_path = out / f"hessian_blocks_r{ctx.round}.png"
            heatmap(sigma, figure_path, f"$\\sigma_{{\\max}}(H_{{ij}})$, round {ctx.round}", annotate=True,
                     label="$\\sigma_{\\max}(H_{ij})$", axis="block", row_norms=row_norms)
            result["figure"] = relative_path(figure_path, ctx)
            result["array"] = relative_path(array_path, ctx)
        return result


def auto_lambda(ctx: MeasureContext, batches: list[tuple[Tensor, Tensor]] | None = None,
                unit: HessianBlocks | None = None) -> tuple[list[float], dict]:
    """lambda = "auto": lambda_i = sqrt(n) * max_k Lbar_k for every block i (n = number of blocks, Lbar the
    off-diagonal row norms of `hessian_blocks`), measured on the training objective: training mode (BatchNorm
    with batch statistics, its buffers untouched) on each of `batches` (default: ctx.batch), Lbar averaged
    over them. Returns the lambdas and the first batch's hessian_blocks result with the mean row norms and the
    spread: "lambda_per_batch" (the lambda each batch alone gives), "lambda_spread" (their relative standard
    deviation, 0 for one batch), "batches" and "hvp" (products over all batches)."""
    unit = unit or HessianBlocks(mode="train")
    batches = batches or [ctx.batch]
    results = []
    for k, batch in enumerate(batches):
        measured = dataclasses.replace(ctx, batch=batch)
        if k > 0:
            unit_k = copy.copy(unit)
            unit_k.figure = False  # one heat map per measurement is enough
            unit_k.seed = unit.seed + k
            results.append(unit_k.measure(measured))
        else:
            results.append(unit.measure(measured))
    n = ctx.params.n_blocks
    rows = np.array([r["row_norms"] for r in results], dtype=float)
    mean_rows = rows.mean(axis=0)
    per_batch = [math.sqrt(n) * float(r.max(initial=0.0)) for r in rows]
    lam = math.sqrt(n) * float(mean_rows.max(initial=0.0))
    spread = float(np.std(per_batch) / np.mean(per_batch)) if len(per_batch) > 1 and np.mean(per_batch) > 0 else 0.0
    result = dict(results[0])
    result.update(row_norms=mean_rows.tolist(), lambda_per_batch=per_batch, lambda_spread=spread,
                  batches=len(batches), hvp=sum(r["hvp"] for r in results),
                  converged=all(r["converged"] for r in results))
    return [lam] * n, result
