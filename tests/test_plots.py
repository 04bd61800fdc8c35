"""The course's plots: fitted slopes and the block diagrams chapters draw."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from minimodels.plots import block_diagram, fit_slope, scaling  # noqa: E402


def test_fit_slope_recovers_a_power_law():
    x = [16, 64, 256, 1024]
    assert fit_slope(x, [3 * v ** 1.5 for v in x]) == pytest.approx(1.5)
    _, slopes = scaling(x, {"quadratic": [v * v for v in x]})
    assert slopes["quadratic"] == pytest.approx(2.0)
    plt.close("all")


def test_block_diagram_draws_every_box_and_skip():
    ax = block_diagram(["x", "norm", ["q", "k", "v"], "out"], skips=[(0, 3)],
                       notes={0: "(b, l, d)"}, title="t")
    labels = [t.get_text() for t in ax.texts]
    assert {"x", "norm", "q", "k", "v", "out", "(b, l, d)", "⊕"} <= set(labels)
    assert len(ax.patches) == 6 + 3 + 1  # 6 boxes, 3 arrows between stages, 1 skip arrow
    with pytest.raises(ValueError, match="skips must be pairs"):
        block_diagram(["a", "b"], skips=[(1, 0)])
    plt.close("all")
