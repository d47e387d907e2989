"""Heat maps of block-pair matrices (hessian_blocks, hessian_dense), written as PNG beside the run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def heatmap(matrix: np.ndarray, path: Path, title: str, *, annotate: bool, label: str, axis: str,
             boundaries: list[int] | None = None, row_norms: np.ndarray | None = None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=float)
    n_rows, n_cols = m.shape
    side = min(12.0, max(4.0, 0.6 * n_cols + 2.5)) if annotate else 7.0
    fig = Figure(figsize=(side + 1.2, side), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positive = m[m > 0]
    norm = None
    if positive.size and np.all(m >= 0) and positive.max() / positive.min() > 100 and positive.size == m.size:
        norm = LogNorm(vmin=positive.min(), vmax=positive.max())
    image = ax.imshow(m, cmap="viridis", norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)
    if annotate and n_rows <= 24 and n_cols <= 24:
        lo, hi = (float(np.nanmin(m)), float(np.nanmax(m))) if m.size else (0.0, 0.0)
        size = max(5, min(10, int(120 / max(n_rows, n_cols, 1))))
        for r in range(n_rows):
            for c in range(n_cols):
                value = m[r, c]
                if norm is not None:
                    shade = norm(value)
                else:
                    shade = (value - lo) / (hi - lo) if hi > lo else 0.5
                ax.text(c, r, f"{value:.3g}", ha="center", va="center", fontsize=size,
                        color="black" if shade > 0.6 else "white")
    for b in boundaries or []:
        ax.axhline(b - 0.5, color="white", linewidth=0.8)
        ax.axvline(b - 0.5, color="white", linewidth=0.8)
    if n_rows <= 24:
        ticks = list(range(n_rows))
        ax.set_yticks(ticks)
        if row_norms is not None:
            ax.set_yticklabels([f"{r}  ($\\bar{{L}}$ = {row_norms[r]:.3g})" for r in ticks])
        ax.set_xticks(list(range(n_cols)))
    ax.set_xlabel(f"{axis} j")
    ax.set_ylabel(f"{axis} i")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
