"""The inner solvers' table: the built-in fused ones (their flat state buffers; the ops in bcdcore.ops) and
plugin solvers, `[algorithm] solver = "pkg.module:Solver"`.

A plugin solver is a class, created once per run with `[algorithm.args]` as keyword arguments, with:

    n_state: int        parameter-sized state buffers it needs (momentum: 1, Adam: 2); the engine keeps them
                        flat, zeroes a block's slice at each anchor under state_policy = "reset" and checkpoints
    step(x, g, a, state, *, lr, lam, step) -> (r2, d2)
                        one proximal step on a flat block slice: x (updated in place), g the loss gradient at x,
                        a the anchor, state the block's slices of the state buffers (updated in place), step the
                        block's step counter (1, 2, ...); returns ||g + lam (x - a)||^2 and ||x - a||^2 at the
                        pre-step point: the norms the inexactness rule needs.

Plain PyTorch is enough: the engine adds what the fused ops do inside their kernel (the rule's skip, which
keeps x and the state where the rule stopped, and the damping of the round's last step) around the step, so a
plugin solver runs under every ops backend.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bcdcore import ops, plugins
from bcdcore.recipe import AlgorithmConfig

BUILTIN_STATE = {"sgd": 0, "momentum": 1, "adam": 2}  # flat state buffers of each built-in solver
WHERE = "algorithm.solver"


class PluginSolver:
    """A plugin solver's instance with the engine's side of the fused-op contract around its step."""

    def __init__(self, cfg: AlgorithmConfig) -> None:
        cls = plugins.resolve(cfg.solver, "solver", WHERE)
        self.path = cfg.solver
        self.impl = plugins.call(cls, cfg.solver, WHERE, "solver", **cfg.args)
        n_state = getattr(self.impl, "n_state", 0)
        if isinstance(n_state, bool) or not isinstance(n_state, int) or not 0 <= n_state <= 16:
            raise plugins.PluginError(f"{WHERE} = {cfg.solver!r}: n_state = {n_state!r} must be an integer "
                                      f"in [0, 16] (parameter-sized state buffers)")
        self.n_state = n_state
        probe = torch.zeros(1)
        plugins.check_call(self.impl.step, cfg.solver, WHERE, "solver", probe, probe, probe,
                           [probe] * n_state, lr=1.0, lam=0.0, step=1)
        # One step of a separate instance on a tiny slice: a wrong return is refused before the run starts
        # (exit 2), not by a failed run; the run's own instance has taken no step.
        trial = plugins.call(cls, cfg.solver, WHERE, "solver", **cfg.args)
        x, g, a = torch.ones(4), torch.full((4,), 0.5), torch.zeros(4)
        self.impl, kept = trial, self.impl
        try:
            self.step(x, g, a, [torch.zeros(4) for _ in range(n_state)], lr=1e-3, lam=0.1, step=1, gamma=None,
                      out=None, skip=None, backend="reference")
        finally:
            self.impl = kept

    def step(self, x: Tensor, g: Tensor, a: Tensor, state: list[Tensor], *, lr: float, lam: float, step: int,
             gamma: float | None, out: Tensor | None, skip: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
        norm_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if skip is not None and skip.device.type == "cpu" and skip[0].item() != 0:
            # the rule stopped before this step and the host sees it for free: the step is not taken (x, state
            # stay), only the damped write; the norms are the certified point's
            if gamma is not None or out is not None:
                ops.damp_(x, a, gamma=gamma, out=out, backend=backend)
            return skip[1].to(norm_dtype), skip[2].to(norm_dtype)
        # on a device the decision stays there: the step runs and is undone where the rule had stopped
        kept = [x.clone(), *(s.clone() for s in state)] if skip is not None and skip.device.type != "cpu" else None
        try:
            result = self.impl.step(x, g, a, state, lr=lr, lam=lam, step=step)
        except Exception as exc:
            raise plugins.PluginError(f"{WHERE} = {self.path!r}: step raised {type(exc).__name__}: "
                                      f"{plugins.first_line(exc)}") from None
        if not (isinstance(result, tuple) and len(result) == 2):
            raise plugins.PluginError(f"{WHERE} = {self.path!r}: step returned {type(result).__name__}, not "
                                      f"(r2, d2), the squared norms of the residual and of x - a")
        if kept is not None:  # the rule had stopped: this step changes nothing (decided on the device)
            stopped = skip[0] != 0
            for live, old in zip([x, *state], kept):
                live.copy_(torch.where(stopped, old, live))
        if gamma is not None or out is not None:  # gamma None + out: the undamped point moves to out (x <- a)
            ops.damp_(x, a, gamma=gamma, out=out, backend=backend)
        r2, d2 = (torch.as_tensor(v, device=x.device).to(norm_dtype).reshape(()) for v in result)
        return r2, d2
