"""How often the point a block returns after an early stop breaks the inexactness rule it was stopped by.

    .venv/bin/python bench/rule_certify.py [--trials 30] [--backend reference|cpu]

Random block quadratics (the `quadratic` dataset, block-linear model, float64, full-batch minibatches so the
gradient is exact), Jacobi, gamma = 1 (the block's new value is the returned point), random lambda, c and lr,
SGD (lr up to 1.5/L), heavy ball (momentum 0.9) and Adam. For every block that stopped early, the rule
||grad F_i(z)|| <= c lambda ||z - a_i|| is re-checked in float64 at the returned z; the script prints, per
solver, the early stops, how many returned points break the rule, and the worst ratio residual / threshold.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: lets it pick a checkout

from bcdcore.algorithm import BlockwiseTrainer  # noqa: E402
from bcdcore.data import load_data  # noqa: E402
from bcdcore.data.batches import BatchStream, stream_seed  # noqa: E402
from bcdcore.models import build_model  # noqa: E402
from bcdcore.params import FlatParams  # noqa: E402
from bcdcore.recipe import AlgorithmConfig, DataConfig, ModelConfig  # noqa: E402

SIZES = [4, 3, 5]


def mse(out, y):
    return F.mse_loss(out.squeeze(-1), y)


def trial(seed: int, solver: str, backend: str) -> list[float]:
    """Ratios residual / threshold at the returned points of every early stop of one round."""
    rng = np.random.default_rng(seed)
    data = load_data(DataConfig(name="quadratic", n_samples=120, n_features=sum(SIZES), noise=0.1,
                                val_fraction=0.0, test_fraction=0.0), seed)
    x, y = data.train.x.double(), data.train.y.double()
    X, Y = x.numpy(), y.numpy()
    A, b = 2 * X.T @ X / len(X), 2 * X.T @ Y / len(X)
    L = max(np.linalg.eigvalsh(A[s:e, s:e]).max() for s, e in zip(np.cumsum([0] + SIZES[:-1]), np.cumsum(SIZES)))
    lam = float(rng.uniform(0.2, 2.0)) * L
    c = float(rng.uniform(0.2, 0.9))
    lr = {"sgd": float(rng.uniform(0.3, 1.5)) / (L + lam), "momentum": float(rng.uniform(0.05, 0.3)) / (L + lam),
          "adam": float(rng.uniform(0.01, 0.1))}[solver]
    cfg = AlgorithmConfig(K=200, lr=lr, solver=solver, momentum=0.9, accuracy_factor=c)
    model = build_model(ModelConfig(name="block_linear", widths=SIZES), (sum(SIZES),), 1, seed).double()
    params = FlatParams(model, model.blocks)
    streams = [BatchStream(x, y, len(x), stream_seed(seed, i)) for i in range(len(SIZES))]
    trainer = BlockwiseTrainer(model, params, mse, streams, cfg, [lam] * 3, [1.0] * 3, backend, seed)
    a = params.flat.detach().numpy().copy()
    reports = trainer.run_round(1).blocks
    z_all = params.flat.detach().numpy().copy()
    ratios = []
    for r in reports:
        if not r.stopped_early:
            continue
        s = slice(params.offsets[r.block], params.offsets[r.block + 1])
        z = a.copy()
        z[s] = z_all[s]
        grad = (A @ z - b)[s] + lam * (z[s] - a[s])
        ratios.append(np.linalg.norm(grad) / (c * lam * np.linalg.norm(z[s] - a[s])))
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--backend", default="reference")
    args = ap.parse_args()
    for solver in ("sgd", "momentum", "adam"):
        ratios = [q for seed in range(args.trials) for q in trial(seed, solver, args.backend)]
        bad = sum(q > 1 + 1e-9 for q in ratios)
        worst = max(ratios) if ratios else float("nan")
        print(f"{solver:9s} early stops {len(ratios):4d}  returned point breaks the rule {bad:4d}  "
              f"worst residual/threshold {worst:.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
