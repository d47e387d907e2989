"""The ops' Python surface: backend selection (best available, the recipe, $BCD_OPS) and the step functions
that dispatch to it. The package docstring (bcdcore.ops) states the contract."""
from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import torch
from torch import Tensor

from bcdcore.ops.reference import REFERENCE

log = logging.getLogger(__name__)

BACKEND_NAMES = ("reference", "cpu", "cuda")


# ----------------------------------------------------------------------------------------------------------
# reference backend


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
        from bcdcore.ops import compiled
    except ImportError as exc:
        log.debug("compiled ops unavailable: %s", exc)
        return
    _backends.update(compiled.backends())


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
        table = _backends[name]
    except KeyError:
        raise ValueError(f"ops backend {name!r} is not available (available: {available_backends()})") from None
    if kind not in table:  # an extension built from older sources, without the multi-slice form
        if name not in _warned:
            _warned.add(name)
            log.warning("the %s ops were built without %s (rebuild: python setup.py build_ext --inplace); using "
                        "the reference backend for it", name, kind)
        return REFERENCE[kind]
    return table[kind]


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


def damp_(x: Tensor, a: Tensor, *, gamma: float | None = None, out: Tensor | None = None,
          backend: str | None = None) -> None:
    """x <- a + gamma * (x - a); with out: out <- that, and x <- a (gamma=None: out <- x, x <- a)."""
    _fn(backend, "damp", x)(x, a, gamma=gamma, out=out)


# ----------------------------------------------------------------------------------------------------------
# the multi-slice forms: one call (one launch on CUDA) over many disjoint slices [start, end) of the flat
# buffers, each with its own lam and gamma; the other constants and the write mode are shared, and the norms
# come back per slice, as two tensors of len(bounds) values on x's device. No rule state (skip/rule_check).

Bounds = Sequence[tuple[int, int]]


def prox_sgd_multi_(x: Tensor, g: Tensor, a: Tensor, *, bounds: Bounds, lr: float, lams: Sequence[float],
                    gammas: Sequence[float] | None = None, out: Tensor | None = None,
                    backend: str | None = None) -> tuple[Tensor, Tensor]:
    return _fn(backend, "sgd_multi", x)(x, g, a, bounds=bounds, lr=lr, lams=lams, gammas=gammas, out=out)


def prox_momentum_multi_(x: Tensor, g: Tensor, a: Tensor, buf: Tensor, *, bounds: Bounds, lr: float,
                         lams: Sequence[float], momentum: float, nesterov: bool = False,
                         gammas: Sequence[float] | None = None, out: Tensor | None = None,
                         backend: str | None = None) -> tuple[Tensor, Tensor]:
    return _fn(backend, "momentum_multi", x)(x, g, a, buf, bounds=bounds, lr=lr, lams=lams, momentum=momentum,
                                             nesterov=nesterov, gammas=gammas, out=out)


def prox_adam_multi_(x: Tensor, g: Tensor, a: Tensor, m: Tensor, v: Tensor, *, bounds: Bounds, lr: float,
                     lams: Sequence[float], beta1: float, beta2: float, eps: float, step: int,
                     gammas: Sequence[float] | None = None, out: Tensor | None = None,
                     backend: str | None = None) -> tuple[Tensor, Tensor]:
    return _fn(backend, "adam_multi", x)(x, g, a, m, v, bounds=bounds, lr=lr, lams=lams, beta1=beta1, beta2=beta2,
                                         eps=eps, step=step, gammas=gammas, out=out)


def damp_multi_(x: Tensor, a: Tensor, *, bounds: Bounds, gammas: Sequence[float] | None = None,
                out: Tensor | None = None, backend: str | None = None) -> None:
    """Per slice s: x <- a + gammas[s] (x - a); with out: out <- that and x <- a (gammas=None: out <- x, x <- a)."""
    _fn(backend, "damp_multi", x)(x, a, bounds=bounds, gammas=gammas, out=out)
