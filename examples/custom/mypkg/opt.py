"""Lion (Chen et al. 2023, "Symbolic discovery of optimization algorithms") as a proximal block solver: the sign
of an interpolated momentum of the proximal gradient r = g + lam (x - a). Plain PyTorch on a flat block slice."""
from __future__ import annotations

from torch import Tensor


class Lion:
    n_state = 1  # one parameter-sized buffer: the momentum

    def __init__(self, beta1: float = 0.9, beta2: float = 0.99) -> None:
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
        self.beta1, self.beta2 = beta1, beta2

    def step(self, x: Tensor, g: Tensor, a: Tensor, state: list[Tensor], *, lr: float, lam: float,
             step: int) -> tuple[Tensor, Tensor]:
        (m,) = state
        d = x - a
        r = g + lam * d  # gradient of F_i(z) = loss + lam/2 ||z - a||^2
        r2, d2 = r.dot(r), d.dot(d)  # at the pre-step point, for the inexactness rule
        update = (self.beta1 * m + (1 - self.beta1) * r).sign_()
        m.mul_(self.beta2).add_(r, alpha=1 - self.beta2)
        x.sub_(update, alpha=lr)
        return r2, d2
