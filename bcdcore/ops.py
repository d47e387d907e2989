"""The fused proximal update and damping ops, behind one Python surface with interchangeable backends.

Every inner step of Algorithm 1 on a flat block slice is, per element (SGD form):

    d = x - a;  r = g + lam * d;  x <- x - lr * r

and returns (r2, d2) = (||r||^2, ||d||^2) taken at the pre-step point: exactly what the inexactness rule needs,
so the rule costs no extra pass. `gamma` (and `out`) fuse the damping of the round's last step into the same
pass: the damped point a + gamma * (x_new - a) is written to `out` when given (and x is restored to a, which is
what Jacobi needs before the next block), else into x itself.

The inexactness rule certifies the point it returns (docs/algorithm.md). Its decision at z_k needs the
gradient at z_k before the step from z_k is taken, so with the rule on an inner step is two passes:

    rule_check_(x, g, a, rule, lam=, coef=c*lam, step=k)   norms pass: reads x, g, a (12 bytes/element, fp32)
    prox_*_step_(..., skip=rule)                            predicated step: not applied once rule says stopped

`rule` is a rule state, `new_rule_state(x)`: 4 float64 values on x's device, [stopped, r2, d2, k]. The norms
pass writes r2 = ||g + lam (x - a)||^2 and d2 = ||x - a||^2 (rounded to the math type), k and
stopped = (sqrt(r2) <= coef * sqrt(d2)) while stopped is 0, and leaves it alone afterwards, so it describes
the certified point. A step given `skip=rule` whose flag is set leaves x and the solver state as they are and
still does its damped write (gamma/out), so the damping applies to the certified point. The flag is read on
the device (CUDA: by the kernel; reference: torch.where), never by the host: the host learns of a stop from
a non-blocking copy of the rule state, a step later (bcdcore.algorithm).

`reference` below is the oracle: plain PyTorch, fp32 math (fp64 when x is fp64). The compiled backends
(`cpu`, `cuda`) must agree with it. Norms come back as 0-dim fp32/fp64 tensors on x's device so a caller
that does not need them never synchronises with the GPU.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

BACKEND_NAMES = ("reference", "cpu", "cuda")
RULE_LEN = 4  # [stopped, r2, d2, k]


def new_rule_state(like: Tensor) -> Tensor:
    """A fresh rule state (not stopped) on `like`'s device: 4 float64 zeros."""
    return torch.zeros(RULE_LEN, dtype=torch.float64, device=like.device)


# ----------------------------------------------------------------------------------------------------------
# reference backend

def _math_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(x: Tensor, *others: Tensor) -> None:
    for t in others:
        if t.numel() != x.numel():
            raise ValueError(f"size mismatch: {tuple(t.shape)} vs {tuple(x.shape)}")
        if t.device != x.device:
            raise ValueError(f"device mismatch: {t.device} vs {x.device}")


def _check_rule(x: Tensor, rule: Tensor, name: str) -> None:
    if rule.dtype != torch.float64:
        raise TypeError(f"{name} (the rule state) must be torch.float64, got {rule.dtype}")
    if rule.numel() != RULE_LEN or not rule.is_contiguous():
        raise ValueError(f"{name} (the rule state) must be {RULE_LEN} contiguous values, got {tuple(rule.shape)}")
    if rule.device != x.device:
        raise ValueError(f"device mismatch: {name} is on {rule.device} but x is on {x.device}")


def _skip_flag(x: Tensor, skip: Tensor | None) -> Tensor | None:
    """The stopped flag of a rule state as a 0-dim bool tensor on the device (no host sync), or None."""
    if skip is None:
        return None
    _check_rule(x, skip, "skip")
    return skip[0] != 0


def _keep(flag: Tensor | None, old: Tensor, new: Tensor) -> Tensor:
    return new if flag is None else torch.where(flag, old, new)


def _finish(x: Tensor, x_new: Tensor, a: Tensor, am: Tensor, gamma: float | None, out: Tensor | None) -> None:
    if gamma is None:
        if out is not None:
            raise ValueError("out= needs gamma=")
        x.copy_(x_new)
        return
    damped = am + gamma * (x_new - am)
    if out is None:
        x.copy_(damped)
    else:
        _check(x, out)
        out.copy_(damped)
        x.copy_(a)


def _ref_sgd(x, g, a, *, lr, lam, gamma=None, out=None, skip=None):
    _check(x, g, a)
    flag = _skip_flag(x, skip)
    dt = _math_dtype(x)
    xm, am = x.to(dt), a.to(dt)
    d = xm - am
    r = g.to(dt) + lam * d
    r2, d2 = (r * r).sum(), (d * d).sum()
    _finish(x, _keep(flag, xm, xm - lr * r), a, am, gamma, out)
    return r2, d2


def _ref_momentum(x, g, a, buf, *, lr, lam, momentum, nesterov=False, gamma=None, out=None, skip=None):
    """Heavy ball as torch.optim.SGD (dampening 0): buf <- mu*buf + r; step = buf (nesterov: r + mu*buf)."""
    _check(x, g, a, buf)
    flag = _skip_flag(x, skip)
    dt = _math_dtype(x)
    xm, am = x.to(dt), a.to(dt)
    d = xm - am
    r = g.to(dt) + lam * d
    r2, d2 = (r * r).sum(), (d * d).sum()
    b = momentum * buf.to(dt) + r
    step = r + momentum * b if nesterov else b
    buf.copy_(_keep(flag, buf, b))
    _finish(x, _keep(flag, xm, xm - lr * step), a, am, gamma, out)
    return r2, d2


def _ref_adam(x, g, a, m, v, *, lr, lam, beta1, beta2, eps, step, gamma=None, out=None, skip=None):
    """Adam on the proximal gradient r (bias-corrected; `step` counts from 1)."""
    _check(x, g, a, m, v)
    flag = _skip_flag(x, skip)
    if step < 1:
        raise ValueError(f"adam step counts from 1, got {step}")
    dt = _math_dtype(x)
    xm, am = x.to(dt), a.to(dt)
    d = xm - am
    r = g.to(dt) + lam * d
    r2, d2 = (r * r).sum(), (d * d).sum()
    mn = beta1 * m.to(dt) + (1 - beta1) * r
    vn = beta2 * v.to(dt) + (1 - beta2) * r * r
    mhat = mn / (1 - beta1 ** step)
    vhat = vn / (1 - beta2 ** step)
    x_new = xm - lr * mhat / (vhat.sqrt() + eps)
    m.copy_(_keep(flag, m, mn))
    v.copy_(_keep(flag, v, vn))
    _finish(x, _keep(flag, xm, x_new), a, am, gamma, out)
    return r2, d2


def _ref_damp(x, a, *, gamma, out=None):
    _check(x, a)
    dt = _math_dtype(x)
    am = a.to(dt)
    _finish(x, x.to(dt), a, am, gamma, out)


def _ref_rule_check(x, g, a, rule, *, lam, coef, step):
    """The norms pass: r2, d2 at x, and the rule state updated unless it is stopped (all on the device)."""
    _check(x, g, a)
    _check_rule(x, rule, "rule")
    dt = _math_dtype(x)
    xm, am = x.to(dt), a.to(dt)
    d = xm - am
    r = g.to(dt) + lam * d
    r2, d2 = (r * r).sum(), (d * d).sum()
    r2d, d2d = r2.to(torch.float64), d2.to(torch.float64)
    holds = (r2d.sqrt() <= coef * d2d.sqrt()).to(torch.float64)
    fresh = torch.stack([holds, r2d, d2d, torch.full_like(r2d, float(step))])
    rule.copy_(torch.where(rule[0] != 0, rule, fresh))
    return r2, d2


REFERENCE = {"sgd": _ref_sgd, "momentum": _ref_momentum, "adam": _ref_adam, "damp": _ref_damp,
             "rule_check": _ref_rule_check}


# ----------------------------------------------------------------------------------------------------------
# backend registry and selection

_backends: dict[str, dict[str, Callable]] = {"reference": REFERENCE}
_loaded = False
_warned: set[str] = set()


def _load_compiled() -> None:
    """Load the compiled backends once (a missing build never breaks the engine)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        from bcdcore import _compiled  # noqa: F401  (added by the kernel issue)
    except ImportError as exc:
        log.debug("compiled ops unavailable: %s", exc)
        return
    _backends.update(_compiled.backends())


def available_backends() -> list[str]:
    _load_compiled()
    return [name for name in BACKEND_NAMES if name in _backends]


def resolve_backend(requested: str | None, device: torch.device | str) -> str:
    """`requested` ("auto"/None = best available for the device; BCD_OPS overrides the recipe)."""
    device = torch.device(device)
    env = os.environ.get("BCD_OPS")
    if env:
        if env not in BACKEND_NAMES:
            raise ValueError(f"BCD_OPS={env!r} is not a backend; use one of {', '.join(BACKEND_NAMES)}")
        requested = env
    available = available_backends()
    best = "cuda" if device.type == "cuda" else "cpu"
    if requested in (None, "auto"):
        if best in available:
            return best
        if best not in _warned:
            _warned.add(best)
            log.warning("the compiled %s ops are not available; using the reference backend", best)
        return "reference"
    if requested not in available:
        raise ValueError(f"ops backend {requested!r} is not available here (available: {', '.join(available)})")
    if requested != "reference" and requested != best:
        raise ValueError(f"ops backend {requested!r} cannot work on device {device}")
    return requested


def _fn(backend: str | None, kind: str, x: Tensor) -> Callable:
    name = backend or resolve_backend(None, x.device)
    if name not in _backends:
        _load_compiled()
    try:
        return _backends[name][kind]
    except KeyError:
        raise ValueError(f"ops backend {name!r} is not available (available: {available_backends()})") from None


# ----------------------------------------------------------------------------------------------------------
# public surface

def prox_sgd_step_(x: Tensor, g: Tensor, a: Tensor, *, lr: float, lam: float, gamma: float | None = None,
                   out: Tensor | None = None, skip: Tensor | None = None,
                   backend: str | None = None) -> tuple[Tensor, Tensor]:
    return _fn(backend, "sgd", x)(x, g, a, lr=lr, lam=lam, gamma=gamma, out=out, skip=skip)


def prox_momentum_step_(x: Tensor, g: Tensor, a: Tensor, buf: Tensor, *, lr: float, lam: float,
                        momentum: float, nesterov: bool = False, gamma: float | None = None,
                        out: Tensor | None = None, skip: Tensor | None = None,
                        backend: str | None = None) -> tuple[Tensor, Tensor]:
    return _fn(backend, "momentum", x)(x, g, a, buf, lr=lr, lam=lam, momentum=momentum, nesterov=nesterov,
                                       gamma=gamma, out=out, skip=skip)


def prox_adam_step_(x: Tensor, g: Tensor, a: Tensor, m: Tensor, v: Tensor, *, lr: float, lam: float,
                    beta1: float, beta2: float, eps: float, step: int, gamma: float | None = None,
                    out: Tensor | None = None, skip: Tensor | None = None,
                    backend: str | None = None) -> tuple[Tensor, Tensor]:
    return _fn(backend, "adam", x)(x, g, a, m, v, lr=lr, lam=lam, beta1=beta1, beta2=beta2, eps=eps,
                                   step=step, gamma=gamma, out=out, skip=skip)


def rule_check_(x: Tensor, g: Tensor, a: Tensor, rule: Tensor, *, lam: float, coef: float, step: int,
                backend: str | None = None) -> tuple[Tensor, Tensor]:
    """The inexactness rule's norms pass at x (inner step `step`): returns (r2, d2) and, unless `rule` already
    says stopped, writes [sqrt(r2) <= coef * sqrt(d2), r2, d2, step] into it, on x's device."""
    return _fn(backend, "rule_check", x)(x, g, a, rule, lam=lam, coef=coef, step=step)


def damp_(x: Tensor, a: Tensor, *, gamma: float, out: Tensor | None = None, backend: str | None = None) -> None:
    """x <- a + gamma * (x - a); with out: out <- that, and x <- a."""
    _fn(backend, "damp", x)(x, a, gamma=gamma, out=out)
