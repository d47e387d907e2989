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

import copy
import dataclasses
import difflib
import importlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from bcdcore.params import FlatParams

__all__ = [
    "MeasureContext",
    "Measurement",
    "MemoryUsage",
    "HessianDense",
    "HessianBlocks",
    "BUILTIN",
    "load_unit",
    "auto_lambda",
    "fixed_batch",
    "block_sigma_max",
    "GradNorm",
    "training_batches",
]

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


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _rel(path: Path, ctx: MeasureContext) -> str:
    """`path` relative to the run directory (the parent of out_dir), else absolute."""
    try:
        return str(path.relative_to(ctx.out_dir.parent))
    except ValueError:
        return str(path.resolve())


def _out_dir(ctx: MeasureContext) -> Path:
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


class _EvalMode:
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


def _param_names(model: nn.Module, params: FlatParams) -> list[list[str]]:
    """The model's name of every parameter, per block, in the order of the flat buffer."""
    names = {id(p): name for name, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in ps] for ps in params.block_params]
    except KeyError:
        raise ValueError("the parameter store holds a parameter that is not the model's") from None


def _to_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _state_snapshot(model: nn.Module, params: FlatParams) -> tuple[Tensor, Tensor, list[Tensor]]:
    return (params.flat.detach().clone(), params.grad.detach().clone(),
            [b.detach().clone() for b in model.buffers()])


def _check_untouched(unit: str, model: nn.Module, params: FlatParams, before) -> None:
    flat, grad, buffers = before
    now = list(model.buffers())
    same = (torch.equal(flat, params.flat) and torch.equal(grad, params.grad) and len(now) == len(buffers)
            and all(torch.equal(a, b) for a, b in zip(buffers, now)))
    if not same:  # a bug in this module, never a user error
        raise RuntimeError(f"{unit}: the measurement changed the model's parameters, gradients or buffers")


# ----------------------------------------------------------------------------------------------------------
# memory


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
            "parameters": _nbytes(ctx.params.flat),
            "gradients": _nbytes(ctx.params.grad),
            "solver_state": sum(_nbytes(t) for t in state),
            "algorithm_buffers": sum(_nbytes(t) for t in algorithm if isinstance(t, Tensor)),
            "model_buffers": sum(_nbytes(b) for b in ctx.model.buffers()),
        }
        result: dict = {"value": sum(parts.values()), **parts, "n_params": ctx.params.flat.numel()}
        device = torch.device(ctx.device)
        if device.type == "cuda" and torch.cuda.is_available():
            result["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
            result["peak_source"] = "cuda_max_memory_allocated"
        else:
            result["peak_bytes"] = _peak_rss()
            result["peak_source"] = "ru_maxrss"
        return result


def _peak_rss() -> int | None:
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# ----------------------------------------------------------------------------------------------------------
# dense Hessian (small models)


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
        before = _state_snapshot(model, params)
        names = [name for block in _param_names(model, params) for name in block]
        work = copy.deepcopy(model).double().eval()
        leaves = [work.get_parameter(name) for name in names]
        for p in work.parameters():
            p.requires_grad_(False)
        for p in leaves:
            p.requires_grad_(True)
        x, y = (_to_dtype(t, torch.float64) for t in ctx.batch)

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
        _check_untouched(self.name, model, params, before)

        matrix = hess.cpu().numpy()
        out = _out_dir(ctx)
        array_path = out / f"hessian_dense_r{ctx.round}.npy"
        np.save(array_path, matrix)
        figure_path = out / f"hessian_dense_r{ctx.round}.png"
        _heatmap(np.abs(matrix), figure_path, f"|H| (dense, {n} parameters), round {ctx.round}",
                 boundaries=params.offsets[1:-1], annotate=False, label="$|H_{kl}|$", axis="parameter")
        return {"value": matrix.tolist(), "array": _rel(array_path, ctx), "figure": _rel(figure_path, ctx),
                "n_params": n, "block_offsets": list(params.offsets)}


# ----------------------------------------------------------------------------------------------------------
# block couplings (matrix-free)


class _HVP:
    """Matrix-free products with blocks of the Hessian of loss(batch) at the current parameters, eval mode.

    The gradient g is taken once with create_graph=True; H_ij v (v in block j's coordinates, result in block
    i's) is then one double backward: the gradient w.r.t. block i's parameters of <g_j, v>. The model's own
    parameters are never written: the forward pass runs through torch.func.functional_call on detached leaves
    (sharing storage when no dtype change is asked for).
    """

    def __init__(self, model: nn.Module, params: FlatParams, loss_fn: LossFn, batch: tuple[Tensor, Tensor],
                 dtype: torch.dtype, own_buffers: bool = False) -> None:
        names = _param_names(model, params)
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
                feed[name] = _to_dtype(b.detach(), dtype).clone()
        x, y = (_to_dtype(t, dtype) for t in batch)
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


def _start_vector(n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    return v / v.norm()


def block_sigma_max(matvec: Callable[[Tensor], Tensor], rmatvec: Callable[[Tensor], Tensor], n_in: int,
                    n_out: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float64,
                    device: torch.device | str = "cpu", method: str = "lanczos", tol: float = 1e-4,
                    max_iter: int | None = None, checks: int = 3) -> tuple[float, int, bool]:
    """sigma_max of an operator B (n_out x n_in) given v -> B v and u -> B^T u; (sigma, iterations, converged).

    method "lanczos": Golub-Kahan-Lanczos bidiagonalisation with full reorthogonalisation, B V_k = U_k B_k,
    from a random v_1 drawn from `generator`; the estimate is sigma_max(B_k) (a lower bound that increases
    with k) and a run stops when the Ritz residual ||B^T u - sigma v|| = beta_k |p_k| is at most tol * sigma
    (an exact invariant subspace, beta_k = 0, stops it too). That certifies *a* singular value, not the largest:
    a start vector nearly orthogonal to the top right singular vector converges to a lower one first. So the
    result is checked by restarts with deflation: a new run from a fresh random start, kept orthogonal to the
    converged right Ritz vectors, must find nothing above sigma * (1 + tol); when it does, its value is the new
    estimate and the check repeats (at most `checks` restarts; converged = the last check passed). method
    "power": power iteration on B^T B, v <- B^T (B v) normalised, estimate ||B^T B v|| / ||B v|| (also a lower
    bound), stopped when it changes by at most tol relative. Both work on B^T B (or its bidiagonal factor):
    never on the paired operator [[0, B], [B^T, 0]], whose eigenvalue pairs +/-sigma make power iteration
    oscillate and its Rayleigh quotient biased.
    """
    device = torch.device(device)
    max_dim = min(n_in, n_out)
    if max_dim == 0:
        return 0.0, 0, True
    if method == "lanczos":
        # One step past min(n_in, n_out) makes a rectangular B exact: U (or V) then spans a whole space.
        max_iter = min(max_iter or 64, max_dim + 1)
        sigma, its, ok, v = _golub_kahan(matvec, rmatvec, n_in, generator, dtype, device, tol, max_iter, [])
        found = [v] if v is not None else []
        certified = checks == 0  # checks = 0: a single run, trusted (the behaviour this check replaces)
        for _ in range(checks):
            if not found or len(found) >= n_in or sigma == 0.0:
                certified = True  # nothing left to deflate against, or B = 0
                break
            other, more, ok2, v2 = _golub_kahan(matvec, rmatvec, n_in, generator, dtype, device, tol,
                                                min(max_iter, n_in - len(found) + 1), found)
            its += more
            if other <= sigma * (1.0 + tol):
                certified = True  # the complement of the converged vectors holds nothing larger
                break
            sigma, ok = other, ok2  # the earlier run had missed a larger singular value
            if v2 is None:
                break
            found.append(v2)
        return sigma, its, ok and certified
    if method == "power":
        return _power(matvec, rmatvec, n_in, generator, dtype, device, tol, max_iter or 500)
    raise ValueError(f"unknown method {method!r}; use 'lanczos' or 'power'")


def _reorthogonalise(w: Tensor, basis: list[Tensor]) -> Tensor:
    if basis:
        q = torch.stack(basis)
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - q.T @ (q @ w)
    return w


def _golub_kahan(matvec, rmatvec, n_in, generator, dtype, device, tol, max_iter,
                 deflate: list[Tensor]) -> tuple[float, int, bool, Tensor | None]:
    """One Golub-Kahan-Lanczos run on B restricted to the orthogonal complement of `deflate` (unit right
    vectors): (sigma, iterations, converged, the top right Ritz vector)."""
    v = _reorthogonalise(_start_vector(n_in, generator, dtype, device), deflate)
    v = v / v.norm()
    u = matvec(v)
    alpha = float(u.norm())
    if alpha == 0.0:  # B v = 0 for a random v: B = 0 on this subspace (almost surely)
        return 0.0, 1, True, v
    u = u / alpha
    vs, us = [v], [u]
    alphas, betas = [alpha], []
    sigma = alpha

    def ritz(right: np.ndarray) -> Tensor:
        coef = torch.as_tensor(right, dtype=dtype, device=device)
        r = torch.stack(vs).T @ coef
        return r / r.norm()

    for k in range(1, max_iter + 1):
        w = _reorthogonalise(rmatvec(u) - alpha * v, deflate + vs)
        beta = float(w.norm())
        bidiag = np.diag(alphas) + np.diag(betas, 1)
        left, singular, right = np.linalg.svd(bidiag)
        sigma = float(singular[0])
        residual = beta * abs(float(left[-1, 0]))
        if residual <= tol * sigma or k == max_iter:
            return sigma, k, residual <= tol * sigma, ritz(right[0])
        v = w / beta
        w = _reorthogonalise(matvec(v) - beta * u, us)
        alpha = float(w.norm())
        betas.append(beta)
        alphas.append(alpha)
        vs.append(v)
        if alpha <= 100 * torch.finfo(dtype).eps * sigma:  # B V_{k+1} lies in span(U_k): exact estimate
            bidiag = np.diag(alphas) + np.diag(betas, 1)
            _, singular, right = np.linalg.svd(bidiag)
            return float(singular[0]), k + 1, True, ritz(right[0])
        u = w / alpha
        us.append(u)
    return sigma, max_iter, False, None  # pragma: no cover (the loop returns)


def _power(matvec, rmatvec, n_in, generator, dtype, device, tol, max_iter) -> tuple[float, int, bool]:
    v = _start_vector(n_in, generator, dtype, device)
    sigma, delta = 0.0, math.inf
    for k in range(1, max_iter + 1):
        u = matvec(v)
        norm_u = float(u.norm())
        if norm_u == 0.0:
            return 0.0, k, True
        w = rmatvec(u / norm_u)  # = B^T B v / ||B v||
        estimate = float(w.norm())
        if estimate == 0.0:
            return norm_u, k, True
        # The estimate grows geometrically towards sigma_max with ratio q ~ (sigma_2 / sigma_1)^2; the
        # remaining error is about delta * q / (1 - q), so a slow rate needs a smaller step to stop.
        previous, delta = delta, abs(estimate - sigma)
        q = min(delta / previous, 0.999) if previous > 0 and math.isfinite(previous) else 0.0
        sigma = estimate
        if delta <= tol * sigma and delta * q / (1.0 - q) <= tol * sigma:
            return sigma, k, True
        v = w / estimate
    return sigma, max_iter, False


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
        with _EvalMode(model, train=train), torch.random.fork_rng(devices=devices, enabled=train):
            hvp = _HVP(model, params, ctx.loss_fn, ctx.batch, dtype, own_buffers=train)
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
            out = _out_dir(ctx)
            array_path = out / f"hessian_blocks_r{ctx.round}.npy"
            np.save(array_path, sigma)
            figure_path = out / f"hessian_blocks_r{ctx.round}.png"
            _heatmap(sigma, figure_path, f"$\\sigma_{{\\max}}(H_{{ij}})$, round {ctx.round}", annotate=True,
                     label="$\\sigma_{\\max}(H_{ij})$", axis="block", row_norms=row_norms)
            result["figure"] = _rel(figure_path, ctx)
            result["array"] = _rel(array_path, ctx)
        return result


# ----------------------------------------------------------------------------------------------------------
# the theorem's quantities


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
        names = _param_names(model, params)
        leaves = [[p.detach().requires_grad_(True) for p in ps] for ps in params.block_params]
        feed = {name: leaf for bn, bl in zip(names, leaves) for name, leaf in zip(bn, bl)}
        train = self.mode == "train"
        x, y = self._data(ctx)
        total = len(x)
        flat_leaves = [leaf for block in leaves for leaf in block]
        grads = [torch.zeros_like(leaf, dtype=torch.float64) for leaf in flat_leaves]
        loss_sum = 0.0
        devices = [params.flat.device] if params.flat.device.type == "cuda" else []
        with _EvalMode(model, train=train), torch.random.fork_rng(devices=devices, enabled=train):
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


# ----------------------------------------------------------------------------------------------------------
# heat maps (matplotlib's object API on an Agg canvas: no pyplot, no global backend switch)


def _heatmap(matrix: np.ndarray, path: Path, title: str, *, annotate: bool, label: str, axis: str,
             boundaries: list[int] | None = None, row_norms: np.ndarray | None = None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=float)
    n_rows, n_cols = m.shape
    side = min(12.0, max(4.0, 0.6 * n_cols + 2.5)) if annotate else 7.0
    fig = Figure(figsize=(side + 1.2, side), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positive = m[m > 0]
    norm = None
    if positive.size and np.all(m >= 0) and positive.max() / positive.min() > 100 and positive.size == m.size:
        norm = LogNorm(vmin=positive.min(), vmax=positive.max())
    image = ax.imshow(m, cmap="viridis", norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)
    if annotate and n_rows <= 24 and n_cols <= 24:
        lo, hi = (float(np.nanmin(m)), float(np.nanmax(m))) if m.size else (0.0, 0.0)
        size = max(5, min(10, int(120 / max(n_rows, n_cols, 1))))
        for r in range(n_rows):
            for c in range(n_cols):
                value = m[r, c]
                if norm is not None:
                    shade = norm(value)
                else:
                    shade = (value - lo) / (hi - lo) if hi > lo else 0.5
                ax.text(c, r, f"{value:.3g}", ha="center", va="center", fontsize=size,
                        color="black" if shade > 0.6 else "white")
    for b in boundaries or []:
        ax.axhline(b - 0.5, color="white", linewidth=0.8)
        ax.axvline(b - 0.5, color="white", linewidth=0.8)
    if n_rows <= 24:
        ticks = list(range(n_rows))
        ax.set_yticks(ticks)
        if row_norms is not None:
            ax.set_yticklabels([f"{r}  ($\\bar{{L}}$ = {row_norms[r]:.3g})" for r in ticks])
        ax.set_xticks(list(range(n_cols)))
    ax.set_xlabel(f"{axis} j")
    ax.set_ylabel(f"{axis} i")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------------------------------
# registry and lambda = "auto"

BUILTIN: dict[str, type] = {
    "memory": MemoryUsage,
    "hessian_dense": HessianDense,
    "hessian_blocks": HessianBlocks,
    "grad_norm": GradNorm,
}


def load_unit(unit: str, **options) -> Measurement:
    """The measurement named `unit`: a built-in name (`BUILTIN`), or a dotted path to a class,
    "package.module:Class" or "package.module.Class" (the module must be importable), instantiated with
    `options` as keyword arguments. Raises ValueError with one clear line otherwise."""
    if not isinstance(unit, str) or not unit.strip():
        raise ValueError(f"measure unit must be a non-empty string, got {unit!r}")
    unit = unit.strip()
    known = ", ".join(BUILTIN)
    if unit in BUILTIN:
        cls = BUILTIN[unit]
    elif ":" in unit or "." in unit:
        cls = _import_class(unit)
    else:
        near = difflib.get_close_matches(unit, list(BUILTIN), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown measure unit {unit!r}{hint}; built-in units: {known}; or a dotted path to "
                         f"a class, 'package.module:Class'")
    try:
        obj = cls(**options) if isinstance(cls, type) else cls
    except TypeError as exc:
        raise ValueError(f"measure unit {unit!r}: cannot create it: {exc}") from None
    if not callable(getattr(obj, "measure", None)):
        raise ValueError(f"measure unit {unit!r} is not a measurement: it needs a measure(ctx) method")
    if not isinstance(getattr(obj, "name", None), str) or not obj.name:
        try:
            obj.name = unit
        except AttributeError:
            raise ValueError(f"measure unit {unit!r} needs a string attribute 'name'") from None
    return obj


def _import_class(unit: str):
    if ":" in unit:
        module_name, _, attr = unit.partition(":")
    else:
        module_name, _, attr = unit.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"measure unit {unit!r}: a dotted path needs a module and a class, "
                         f"'package.module:Class' or 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"measure unit {unit!r}: cannot import module {module_name!r}: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"measure unit {unit!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


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
