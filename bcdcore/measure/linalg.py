"""The linear algebra behind hessian_blocks: the largest singular value of a matrix given only its products
(Golub-Kahan-Lanczos with full reorthogonalisation, or power iteration), from seeded start vectors.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor


def start_vector(n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
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
        sigma, its, ok, v = golub_kahan(matvec, rmatvec, n_in, generator, dtype, device, tol, max_iter, [])
        found = [v] if v is not None else []
        certified = checks == 0  # checks = 0: a single run, trusted (the behaviour this check replaces)
        for _ in range(checks):
            if not found or len(found) >= n_in or sigma == 0.0:
                certified = True  # nothing left to deflate against, or B = 0
                break
            other, more, ok2, v2 = golub_kahan(matvec, rmatvec, n_in, generator, dtype, device, tol,
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
        return power_iteration(matvec, rmatvec, n_in, generator, dtype, device, tol, max_iter or 500)
    raise ValueError(f"unknown method {method!r}; use 'lanczos' or 'power'")


def reorthogonalise(w: Tensor, basis: list[Tensor]) -> Tensor:
    if basis:
        q = torch.stack(basis)
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - q.T @ (q @ w)
    return w


def golub_kahan(matvec, rmatvec, n_in, generator, dtype, device, tol, max_iter,
                 deflate: list[Tensor]) -> tuple[float, int, bool, Tensor | None]:
    """One Golub-Kahan-Lanczos run on B restricted to the orthogonal complement of `deflate` (unit right
    vectors): (sigma, iterations, converged, the top right Ritz vector)."""
    v = reorthogonalise(start_vector(n_in, generator, dtype, device), deflate)
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
        w = reorthogonalise(rmatvec(u) - alpha * v, deflate + vs)
        beta = float(w.norm())
        bidiag = np.diag(alphas) + np.diag(betas, 1)
        left, singular, right = np.linalg.svd(bidiag)
        sigma = float(singular[0])
        residual = beta * abs(float(left[-1, 0]))
        if residual <= tol * sigma or k == max_iter:
            return sigma, k, residual <= tol * sigma, ritz(right[0])
        v = w / beta
        w = reorthogonalise(matvec(v) - beta * u, us)
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


def power_iteration(matvec, rmatvec, n_in, generator, dtype, device, tol, max_iter) -> tuple[float, int, bool]:
    v = start_vector(n_in, generator, dtype, device)
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
