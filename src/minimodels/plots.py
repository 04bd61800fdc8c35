"""The course's plots: scaling curves on log-log axes with fitted slopes, and block diagrams."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["block_diagram", "fit_slope", "scaling"]


def fit_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x: y ∝ x^slope."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def scaling(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    xlabel: str = "sequence length l",
    ylabel: str = "time (s)",
    title: str | None = None,
    fit_from: int = 0,
    ax=None,
):
    """Log-log plot of each series against ``x`` with its fitted slope in the legend.

    ``fit_from`` skips the first points of the fit (small sizes are dominated by overheads).
    Returns ``(ax, {name: slope})``."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    slopes = {}
    for name, y in series.items():
        slopes[name] = fit_slope(x[fit_from:], y[fit_from:])
        ax.loglog(x, y, "o-", label=f"{name}  (slope {slopes[name]:.2f})")
    ax.set_xticks(list(x), [f"{v:g}" for v in x])  # label the measured sizes, nothing else
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return ax, slopes


def block_diagram(stages: Sequence[str | Sequence[str]], *, skips: Sequence[tuple[int, int]] = (),
                  notes: Mapping[int, str] | None = None, title: str | None = None, ax=None):
    """Draw a block as data flows through it, bottom to top, as papers draw them.

    ``stages[i]`` is one box (a label) or a row of boxes side by side (a list of labels: parallel
    branches, e.g. ``["W_q x", "W_k x", "W_v x"]``); consecutive stages are joined by arrows.
    ``skips`` are residual connections ``(i, j)``: an arrow around the stages from the output of
    stage i into stage j (drawn on the right, with a ⊕). ``notes`` put a shape or a comment beside
    a stage, e.g. ``{0: "(b, l, d)"}``. Returns the axes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    notes = notes or {}
    n = len(stages)
    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 0.75 * n + 0.8))
    width, height, gap = 3.0, 0.5, 0.75
    centers = []
    for i, stage in enumerate(stages):
        row = [stage] if isinstance(stage, str) else list(stage)
        y = i * gap
        w = width / len(row) - 0.1 * (len(row) - 1) / len(row)
        xs = [-width / 2 + w / 2 + k * (w + 0.1) for k in range(len(row))]
        for x, label in zip(xs, row, strict=True):
            ax.add_patch(FancyBboxPatch((x - w / 2, y - height / 2), w, height,
                                        boxstyle="round,pad=0.02,rounding_size=0.08",
                                        facecolor="#e8f0fb", edgecolor="#3a6ea5", lw=1.2))
            ax.text(x, y, label, ha="center", va="center", fontsize=9)
        if i in notes:
            ax.text(width / 2 + 0.95, y, notes[i], ha="left", va="center", fontsize=8,
                    color="#555555")
        centers.append(y)
    for y0, y1 in zip(centers[:-1], centers[1:], strict=True):
        ax.add_patch(FancyArrowPatch((0, y0 + height / 2), (0, y1 - height / 2),
                                     arrowstyle="-|>", mutation_scale=10, color="#333333"))
    for k, (i, j) in enumerate(skips):
        if not (0 <= i < j < n):
            raise ValueError(f"skips must be pairs (i, j) with 0 <= i < j < {n}, got {(i, j)}")
        x = width / 2 + 0.25 + 0.2 * k
        y0, y1 = centers[i] + height / 2 + 0.08, centers[j]
        ax.plot([0.05, x, x], [y0, y0, y1], color="#a55a3a", lw=1.2)
        ax.add_patch(FancyArrowPatch((x, y1), (width / 2 + 0.02, y1), arrowstyle="-|>",
                                     mutation_scale=10, color="#a55a3a"))
        ax.text(width / 2 + 0.12, y1 + 0.17, "⊕", ha="center", va="center", fontsize=11,
                color="#a55a3a")
    ax.set_xlim(-width / 2 - 0.3, width / 2 + 2.4)
    ax.set_ylim(-gap, centers[-1] + gap)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    return ax
