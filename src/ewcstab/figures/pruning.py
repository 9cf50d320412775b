"""Figure of the paper's section 4: test accuracy against the fraction pruned, per importance.

``plot_pruning_curves`` draws one scope (``global``: all parameters ranked together;
``per_layer``: the weights of each layer ranked separately), one panel per (arch, importance
data) present, one line per importance with its 95% band over networks, and the paper's
published points (``paper_pruning.csv``, mean ± 95% CI) in the same colours where the setting
is the paper's (mlp, importances on the test set).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ewcstab.figures import style
from ewcstab.figures.tables import pruning_summary

#: The paper's pruning setting: its numbers are drawn only on the panel of this (arch, importance data).
PAPER_SETTING = ("mlp", "test")
IMPORTANCE_DATA_NAMES = {"test": "importances on the test set (paper)", "heldout": "importances on held-out training data"}


def plot_pruning_curves(curves: pd.DataFrame, scope: str, paper: pd.DataFrame | None = None) -> Figure:
    """Accuracy against sparsity for one ``scope``; ``curves`` per network or averaged (see
    ``tables.pruning_summary``), ``paper`` the paper's table (scope, importance, sparsity, mean_acc, ci95)."""
    summary = pruning_summary(curves)
    summary = summary[summary["scope"] == scope]
    if summary.empty:
        raise ValueError(f"no pruning curves for scope {scope!r}")
    panels = sorted(summary.groupby(["arch", "importance_data"]).groups)
    fig, axes = style.new_panels(len(panels), panel=(5.0, 3.8), max_cols=2, sharey=True)
    drawn: list[str] = []
    paper_drawn = False
    for ax, (arch, data) in zip(axes, panels):
        part = summary[(summary["arch"] == arch) & (summary["importance_data"] == data)]
        for imp in style.ordered(part["importance"].unique(), style.IMPORTANCES):
            c = style.color_of(imp, style.IMPORTANCE_COLORS)
            cur = part[part["importance"] == imp].sort_values("sparsity")
            x, m, h = (cur[k].to_numpy(float) for k in ("sparsity", "mean_acc", "ci95"))
            ax.plot(x, m, color=c, lw=1.6)
            if np.isfinite(h).any():
                ax.fill_between(x, m - h, m + h, color=c, alpha=0.2, lw=0)
            if imp not in drawn:
                drawn.append(imp)
            if paper is not None and (arch, data) == PAPER_SETTING:
                ref = paper[(paper["scope"] == scope) & (paper["importance"] == imp)].sort_values("sparsity")
                if len(ref):
                    ax.errorbar(ref["sparsity"], ref["mean_acc"], yerr=ref["ci95"], fmt="o", ms=4, mfc="white",
                                color=c, capsize=2, lw=0.8, zorder=4)
                    paper_drawn = True
        n = int(part["n_runs"].max()) if "n_runs" in part and part["n_runs"].notna().any() else None
        ax.set_title(f"{arch}, {IMPORTANCE_DATA_NAMES.get(data, data)}" + (f"\n{n} networks" if n else ""),
                     fontsize="medium")
        ax.set_xlabel("parameters pruned (global)" if scope == "global" else "weights pruned in every layer")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        style.percent_axis(ax.xaxis)
        style.percent_axis(ax.yaxis)
        if style.first_in_row(ax):
            ax.set_ylabel("test accuracy after pruning")
    # two lines: a one-panel figure is too narrow for the scope's long name on one line
    fig.suptitle(f"Pruning by weight importance\n{style.SCOPE_NAMES.get(scope, scope)}")
    handles = [Line2D([], [], color=style.color_of(i, style.IMPORTANCE_COLORS), lw=2.5,
                      label=f"{style.IMPORTANCE_NAMES.get(i, i)}: mean ± 95% CI") for i in drawn]
    if paper_drawn:
        handles.append(Line2D([], [], ls="", marker="o", mfc="white", color="#444444", label="paper (same colours): mean ± 95% CI"))
    fig.legend(handles=handles, loc="outside lower center", ncol=2 if len(panels) == 1 else 3, fontsize="small")
    return fig
