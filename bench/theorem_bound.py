"""The convergence theorem of Algorithm 1 on a finished run of recipes/theorem_quadratic.toml (or any run
with `[[measure]] unit = "grad_norm"`, at_start = true, every = 1, and lambda = "auto").

    .venv/bin/python bench/theorem_bound.py RUN_DIR [--f-star VALUE] [--out FILE]

Left side: (1/T) sum_{t=1..T} ||grad f(x_t)||^2 from the grad_norm events (x_t the point after t rounds).
Right side: 2 sqrt(n) Lbar_max (f(x_0) - f*) / T, with Lbar_max = lambda / sqrt(n) from the first
"lambda auto" measurement and f(x_0) from grad_norm at round 0. f* is the least-squares optimum of the
training split when the run's dataset is `quadratic` (computed here from the recipe), else --f-star.
Prints the two per T and the worst ratio, and draws both on log-log axes (default: figures/theorem_bound.png
of the run).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bcdcore.rundir import read_events  # noqa: E402


def least_squares_optimum(run_dir: Path) -> float:
    from bcdcore.data import load_data
    from bcdcore.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.toml")
    if recipe.data.name != "quadratic":
        raise SystemExit(f"f* is only computed for the quadratic dataset (this run: {recipe.data.name}); "
                         f"give --f-star")
    data = load_data(recipe.data, recipe.run.seed)
    x, y = data.train.x.double().numpy(), data.train.y.double().numpy()
    w = np.linalg.lstsq(x, y, rcond=None)[0]
    return float(np.mean((x @ w - y) ** 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--f-star", type=float, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    measures = read_events(args.run_dir, "measure")
    lam = next(m for m in measures if m.get("purpose") == "lambda auto")
    n = len(lam["lambda"])
    lbar = lam["lambda"][0] / math.sqrt(n)
    g = {m["round"]: m for m in measures if m["unit"] == "grad_norm"}
    if 0 not in g:
        raise SystemExit("no grad_norm at round 0: add at_start = true to its [[measure]]")
    f_star = args.f_star if args.f_star is not None else least_squares_optimum(args.run_dir)
    rounds = sorted(t for t in g if t > 0)
    ts, lhs, rhs = [], [], []
    total = 0.0
    for t in rounds:
        total += g[t]["value"]
        ts.append(t)
        lhs.append(total / t)
        rhs.append(2 * math.sqrt(n) * lbar * (g[0]["loss"] - f_star) / t)
    ratios = [a / b for a, b in zip(lhs, rhs)]
    for t, a, b in zip(ts, lhs, rhs):
        print(f"T={t:4d}  mean ||grad f||^2 {a:.4e}  bound {b:.4e}  ratio {a / b:.3f}")
    print(f"worst ratio {max(ratios):.3f} (n={n}, Lbar_max={lbar:.4g}, f(x0)={g[0]['loss']:.4g}, f*={f_star:.4g})")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.loglog(ts, lhs, color="black", label=r"$\frac{1}{T}\sum_{t=1}^{T}\|\nabla f(x_t)\|^2$")
    ax.loglog(ts, rhs, color="red", linestyle="--",
              label=r"$2\sqrt{n}\,\bar L_{\max}(f(x_0)-f^*)/T$")
    ax.set_xlabel("rounds T")
    ax.legend()
    fig.tight_layout()
    out = args.out or args.run_dir / "figures" / "theorem_bound.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
