"""The course's plots: scaling curves on log-log axes with fitted slopes, decay profiles."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["fit_slope", "scaling"]


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
