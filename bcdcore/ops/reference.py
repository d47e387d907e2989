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
        if out is not None:
            raise ValueError("out= needs gamma=")
        x.copy_(x_new)
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


def damp(x, a, *, gamma, out=None):
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


REFERENCE = {"sgd": sgd, "momentum": momentum, "adam": adam, "damp": damp,
             "rule_check": rule_check}
