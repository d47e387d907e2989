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

The multi-slice forms (`prox_*_multi_`, `damp_multi_`) run the same op over many disjoint slices of the flat
buffers in one call, one launch on CUDA, each slice with its own lam and gamma, and return the norms per slice:
a round's damping writes (Jacobi damps every solved block at the round's end) and ResNet-18's 10 blocks in one
launch. `gamma=None` with `out=` moves the undamped point aside: out <- x_new and x <- a.

`reference` below is the oracle: plain PyTorch, fp32 math (fp64 when x is fp64). The compiled backends
(`cpu`, `cuda`) must agree with it. Norms come back as 0-dim fp32/fp64 tensors on x's device so a caller
that does not need them never synchronises with the GPU.
"""
from bcdcore.ops.reference import REFERENCE, RULE_LEN, new_rule_state
from bcdcore.ops.surface import (
                                 BACKEND_NAMES,
                                 available_backends,
                                 damp_,
                                 damp_multi_,
                                 prox_adam_multi_,
                                 prox_adam_step_,
                                 prox_momentum_multi_,
                                 prox_momentum_step_,
                                 prox_sgd_multi_,
                                 prox_sgd_step_,
                                 resolve_backend,
                                 rule_check_,
)

__all__ = ["REFERENCE", "RULE_LEN", "new_rule_state", "BACKEND_NAMES", "available_backends", "damp_",
           "prox_adam_step_", "prox_momentum_step_", "prox_sgd_step_", "resolve_backend", "rule_check_",
           "damp_multi_", "prox_adam_multi_", "prox_momentum_multi_", "prox_sgd_multi_"]
