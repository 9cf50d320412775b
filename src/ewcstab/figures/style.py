"""One look for every figure: seaborn theme, fixed colours per variant and importance, names, saving.

Colours are fixed per name (not per position in a plot) so that "stabilized" or "magnitude" has
the same colour in every figure, notebook and report. The palette is Okabe-Ito (colour-blind
safe); markers carry the same information as colour where it matters (trial state).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, FuncFormatter

#: Canonical orders: panels and legends follow these, whatever order the data come in.
METHODS = ("fisher", "mas", "si", "signal")
VARIANTS = ("original", "stabilized", "clipped")
IMPORTANCES = ("magnitude", "signal", "fisher", "mas", "si")
SCOPES = ("global", "per_layer")

VARIANT_COLORS = {"original": "#0072B2", "stabilized": "#D55E00", "clipped": "#009E73"}
BASELINE_COLOR = "#666666"
IMPORTANCE_COLORS = {
    "magnitude": "#000000", "signal": "#009E73", "fisher": "#0072B2", "mas": "#E69F00", "si": "#CC79A7",
}
FALLBACK_COLORS = ("#56B4E9", "#F0E442", "#D55E00", "#999999")

METHOD_NAMES = {"fisher": "Fisher (EWC)", "mas": "MAS", "si": "SI", "signal": "total signal"}
IMPORTANCE_NAMES = {**METHOD_NAMES, "magnitude": "magnitude |θ|"}
ARCH_NAMES = {
    "mlp": "MLP 784-300-150-10, permuted MNIST",
    "cnn": "CNN, MNIST / Fashion-MNIST / rotated",
    "attention": "self-attention network",
}
SCOPE_NAMES = {"global": "global (whole network, weights and biases)", "per_layer": "per layer (weights of each layer)"}

#: PNG resolution for the report; the PDF is vector.
PNG_DPI = 150


def set_style() -> None:
    """Seaborn's whitegrid theme at a size readable in the report and in notebooks."""
    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.9,
                  rc={"axes.titleweight": "bold", "legend.frameon": False, "savefig.bbox": "tight"})


def color_of(name: str, table: dict[str, str]) -> str:
    """The fixed colour of ``name``; unknown names get a stable fallback (from the name's characters)."""
    if name in table:
        return table[name]
    return FALLBACK_COLORS[sum(map(ord, name)) % len(FALLBACK_COLORS)]


def ordered(values, order: tuple[str, ...]) -> list[str]:
    """Distinct ``values`` in the canonical ``order``, unknown ones after it, alphabetically."""
    present = {str(v) for v in values}
    return [v for v in order if v in present] + sorted(present - set(order))


class PercentTickFormatter(Formatter):
    """Fractions as percentages with as many decimals as the tick spacing needs (70%, 74.5%), no more."""

    def set_locs(self, locs) -> None:
        super().set_locs(locs)
        steps = np.diff(np.sort(np.asarray(locs, dtype=float))) * 100
        step = steps[steps > 0].min() if (steps > 0).any() else 1.0
        self.decimals = max(0, -math.floor(math.log10(step) + 1e-9))

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{100 * x:.{getattr(self, 'decimals', 0)}f}%"


def percent_axis(axis) -> None:
    """Show fractions in [0, 1] as percentages (accuracy, sparsity), decimals as the ticks need."""
    axis.set_major_formatter(PercentTickFormatter())


class PlainLogMinorFormatter(Formatter):
    """Minor tick labels of a log axis as plain numbers (20, 0.3), fewer the more decades are shown:
    none beyond 2 decades, mantissas 2 and 5 beyond 0.7, more below, all below 0.3 decades."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        lo, hi = sorted(self.axis.get_view_interval())
        if lo <= 0 or x <= 0:
            return ""
        decades = math.log10(hi / lo)
        mantissa = round(x / 10 ** math.floor(math.log10(x) + 1e-9), 6)
        if decades > 2:
            return ""
        if decades > 0.7 and mantissa not in (2, 5):
            return ""
        if 0.3 < decades <= 0.7 and mantissa not in (2, 3, 5, 7):
            return ""
        return f"{x:.3g}"


def log_axis(ax, which: str = "x") -> None:
    """Log scale with plain-number labels (1, 10, 0.1 and readable minor labels), not 2x10^1."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(PlainLogMinorFormatter())


def new_figure(n_rows: int, n_cols: int, panel: tuple[float, float] = (3.8, 3.2), **kwargs) -> tuple[Figure, object]:
    """A grid of panels of the given size (inches) with constrained layout; axes always 2-D."""
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(panel[0] * n_cols, panel[1] * n_rows + 0.8), squeeze=False,
                             layout="constrained", **kwargs)
    return fig, axes


def new_panels(n: int, panel: tuple[float, float] = (3.8, 3.2), max_cols: int = 3, **kwargs) -> tuple[Figure, list]:
    """``n`` panels wrapped in rows (4 as 2 x 2, otherwise up to ``max_cols`` per row); the grid's
    unused cells are removed, so no empty axis is drawn. Returns the figure and the n axes in order."""
    n_cols = n if n <= max_cols else (2 if n == 4 else max_cols)
    n_rows = math.ceil(n / n_cols)
    fig, axes = new_figure(n_rows, n_cols, panel, **kwargs)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n]


def first_in_row(ax) -> bool:
    """Whether ``ax`` is the leftmost panel of its row (gets the y label)."""
    return ax.get_subplotspec().is_first_col()


def save_figure(fig: Figure, png: str | Path, pdf: str | Path | None = None) -> None:
    """Write the PNG (report) and optionally the PDF (paper); byte-stable metadata, figure closed."""
    for path, meta in ((png, {"Software": None}), (pdf, {"CreationDate": None, "Producer": None})):
        if path is None:
            continue
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=PNG_DPI, metadata=meta)
    plt.close(fig)
