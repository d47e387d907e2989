"""The `reference` backend: each fused op in plain PyTorch, the oracle the compiled kernels are tested
against (same semantics: the update, the rule's norms at the pre-step point, the predicated skip, damping)."""
from __future__ import annotations

import torch
from torch import Tensor

RULE_LEN = 4  # [stopped, r2, d2, k]


def new_rule_state(like: Tensor) -> Tensor:
    """A fresh rule state (not stopped) on `like`'s device: 4 float64 zeros."""
    return torch.zeros(RULE_LEN, dtype=torch.float64, device=like.device)


def math_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_inputs(x: Tensor, *others: Tensor) -> None:
    for t in others:
        if t.numel() != x.numel():
            raise ValueError(f"size mismatch: {tuple(t.shape)} vs {tuple(x.shape)}")
        if t.device != x.device:
            raise ValueError(f"device mismatch: {t.device} vs {x.device}")


def check_rule(x: Tensor, rule: Tensor, name: str) -> None:
    if rule.dtype != torch.float64:
        raise TypeError(f"{name} (the rule state) must be torch.float64, got {rule.dtype}")
    if rule.numel() != RULE_LEN or not rule.is_contiguous():
        raise ValueError(f"{name} (the rule state) must be {RULE_LEN} contiguous values, got {tuple(rule.shape)}")
    if rule.device != x.device:
        raise ValueError(f"device mismatch: {name} is on {rule.device} but x is on {x.device}")


def skip_flag(x: Tensor, skip: Tensor | None) -> Tensor | None:
    """The stopped flag of a rule state as a 0-dim bool tensor on the device (no host sync), or None."""
    if skip is None:
        return None
    check_rule(x, skip, "skip")
    return skip[0] != 0


def keep_where(flag: Tensor | None, old: Tensor, new: Tensor) -> Tensor:
    return new if flag is None else torch.where(flag, old, new)


def finish(x: Tensor, x_new: Tensor, a: Tensor, am: Tensor, gamma: float | None, out: Tensor | None) -> None:
    if gamma is None:
        if out is None:
            x.copy_(x_new)
        else:  # the undamped point moved aside (Jacobi defers the damping to the round's end)
            check_inputs(x, out)
            out.copy_(x_new)
            x.copy_(a)
        return
    damped = am + gamma * (x_new - am)
    if out is None:
        x.copy_(damped)
    else:
        check_inputs(x, out)
        out.copy_(damped)
        x.copy_(a)


def residual(x: Tensor, g: Tensor, a: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """In the math dtype: x, a, the proximal gradient r = g + lam (x - a), and the rule's two squared norms
    ||r||^2 and ||x - a||^2 at the pre-step point (every form starts here)."""
    dt = math_dtype(x)
    xm, am = x.to(dt), a.to(dt)
    d = xm - am
    r = g.to(dt) + lam * d
    return xm, am, r, (r * r).sum(), (d * d).sum()


def sgd(x, g, a, *, lr, lam, gamma=None, out=None, skip=None):
    check_inputs(x, g, a)
    flag = skip_flag(x, skip)
    xm, am, r, r2, d2 = residual(x, g, a, lam)
    finish(x, keep_where(flag, xm, xm - lr * r), a, am, gamma, out)
    return r2, d2


def momentum(x, g, a, buf, *, lr, lam, momentum, nesterov=False, gamma=None, out=None, skip=None):
    """Heavy ball as torch.optim.SGD (dampening 0): buf <- mu*buf + r; step = buf (nesterov: r + mu*buf)."""
    check_inputs(x, g, a, buf)
    flag = skip_flag(x, skip)
    xm, am, r, r2, d2 = residual(x, g, a, lam)
    b = momentum * buf.to(r.dtype) + r
    step = r + momentum * b if nesterov else b
    buf.copy_(keep_where(flag, buf, b))
    finish(x, keep_where(flag, xm, xm - lr * step), a, am, gamma, out)
    return r2, d2


def adam(x, g, a, m, v, *, lr, lam, beta1, beta2, eps, step, gamma=None, out=None, skip=None):
    """Adam on the proximal gradient r (bias-corrected; `step` counts from 1)."""
    check_inputs(x, g, a, m, v)
    flag = skip_flag(x, skip)
    if step < 1:
        raise ValueError(f"adam step counts from 1, got {step}")
    xm, am, r, r2, d2 = residual(x, g, a, lam)
    mn = beta1 * m.to(r.dtype) + (1 - beta1) * r
    vn = beta2 * v.to(r.dtype) + (1 - beta2) * r * r
    mhat = mn / (1 - beta1 ** step)
    vhat = vn / (1 - beta2 ** step)
    x_new = xm - lr * mhat / (vhat.sqrt() + eps)
    m.copy_(keep_where(flag, m, mn))
    v.copy_(keep_where(flag, v, vn))
    finish(x, keep_where(flag, xm, x_new), a, am, gamma, out)
    return r2, d2


def damp(x, a, *, gamma=None, out=None):
    if gamma is None and out is None:
        raise ValueError("damp_ needs gamma= or out=")
    check_inputs(x, a)
    dt = math_dtype(x)
    am = a.to(dt)
    finish(x, x.to(dt), a, am, gamma, out)


def rule_check(x, g, a, rule, *, lam, coef, step):
    """The norms pass: r2, d2 at x, and the rule state updated unless it is stopped (all on the device)."""
    check_inputs(x, g, a)
    check_rule(x, rule, "rule")
    xm, am, r, r2, d2 = residual(x, g, a, lam)
    r2d, d2d = r2.to(torch.float64), d2.to(torch.float64)
    holds = (r2d.sqrt() <= coef * d2d.sqrt()).to(torch.float64)
    fresh = torch.stack([holds, r2d, d2d, torch.full_like(r2d, float(step))])
    rule.copy_(torch.where(rule[0] != 0, rule, fresh))
    return r2, d2


# ---- the multi-slice forms: the one-buffer op on each slice [start, end) of the flat buffers, with that slice's
# lam and gamma (the per-block constants of Algorithm 1); per-slice norms as tensors of len(bounds) values.

def check_bounds(x: Tensor, bounds, lams, gammas) -> None:
    bounds = list(bounds)
    if lams is not None and len(lams) != len(bounds):
        raise ValueError(f"{len(bounds)} slices but {len(lams)} lams")
    if gammas is not None and len(gammas) != len(bounds):
        raise ValueError(f"{len(bounds)} slices but {len(gammas)} gammas")
    prev = 0
    for i, (lo, hi) in enumerate(bounds):
        if not 0 <= lo <= hi <= x.numel():
            raise ValueError(f"slice {i} [{lo}, {hi}) is not inside the {x.numel()} elements of x")
        if lo < prev:
            raise ValueError(f"slice {i} [{lo}, {hi}) overlaps or precedes slice {i - 1}; slices must be "
                             "disjoint and in order")
        prev = hi


def multi(op, x, views, bounds, lams, gammas, out, **kw):
    """`op` on every slice: `views` are the other flat operands (sliced alike); norms stacked per slice."""
    check_bounds(x, bounds, lams, gammas)
    r2s, d2s = [], []
    for i, (lo, hi) in enumerate(bounds):
        extra = {} if lams is None else {"lam": lams[i]}
        res = op(x[lo:hi], *(t[lo:hi] for t in views), **kw, **extra,
                 gamma=None if gammas is None else gammas[i], out=None if out is None else out[lo:hi])
        if res is not None:
            r2s.append(res[0])
            d2s.append(res[1])
    if lams is None:
        return None
    if not r2s:
        empty = torch.zeros(0, dtype=math_dtype(x), device=x.device)
        return empty, empty.clone()
    return torch.stack(r2s), torch.stack(d2s)


def sgd_multi(x, g, a, *, bounds, lr, lams, gammas=None, out=None):
    check_inputs(x, g, a)
    return multi(sgd, x, (g, a), bounds, lams, gammas, out, lr=lr)


def momentum_multi(x, g, a, buf, *, bounds, lr, lams, momentum, nesterov=False, gammas=None, out=None):
    check_inputs(x, g, a, buf)
    return multi(globals()["momentum"], x, (g, a, buf), bounds, lams, gammas, out, lr=lr, momentum=momentum,
                 nesterov=nesterov)


def adam_multi(x, g, a, m, v, *, bounds, lr, lams, beta1, beta2, eps, step, gammas=None, out=None):
    check_inputs(x, g, a, m, v)
    return multi(adam, x, (g, a, m, v), bounds, lams, gammas, out, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                 step=step)


def damp_multi(x, a, *, bounds, gammas=None, out=None):
    if gammas is None and out is None:
        raise ValueError("damp needs gammas= or out=")
    check_inputs(x, a)
    multi(damp, x, (a,), bounds, None, gammas, out)


REFERENCE = {"sgd": sgd, "momentum": momentum, "adam": adam, "damp": damp,
             "rule_check": rule_check, "sgd_multi": sgd_multi, "momentum_multi": momentum_multi,
             "adam_multi": adam_multi, "damp_multi": damp_multi}
