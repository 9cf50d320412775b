"""Figures of the gradient-explosion study (``ewcstab.explosion``; paper Section 2's claim that plain EWC
explodes in deeper networks and that clipping hides it).

- ``plot_explosion_accuracy``: mean accuracy after the last task against lambda (log scale), one line
  per variant (original, stabilized, clipped), panels per arch (and method) x optimizer. Runs that
  diverged are left out of the mean and drawn as crosses at the bottom of the panel, with their count.
- ``plot_explosion_traces``: the total gradient norm (before clipping) of one traced run per variant
  at a large lambda, step by step across all tasks (log y), task boundaries dotted, the clipping
  threshold dashed, and a cross where a run diverged.

Both return the matplotlib Figure; ``style.save_figure`` writes it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ewcstab.explosion import per_run, summarize
from ewcstab.figures import style

OPTIMIZERS = ("adam", "sgd")
ARCHS = ("mlp", "cnn", "attention")
ACC_LABEL = "mean test accuracy after the last task"
LAMBDA_LABEL = "λ, penalty strength (log scale)"
#: y (axes fraction) of the crosses of diverged runs, and of their counts above them.
BOTTOM, COUNT_Y = 0.03, 0.085
#: Horizontal offset of each variant (in decades of lambda), so points at one lambda do not hide each other.
DODGE = {"original": -0.06, "stabilized": 0.0, "clipped": 0.06}
SHORT_ARCH = {"mlp": "MLP", "cnn": "CNN", "attention": "attention"}


def _panel_rows(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(arch, method) pairs present, archs in the canonical order, then methods."""
    pairs = {(a, m) for a, m in zip(df["arch"], df["method"])}
    return [(a, m) for a in style.ordered({a for a, _ in pairs}, ARCHS)
            for m in style.ordered({m for b, m in pairs if b == a}, style.METHODS)]


def _dodge(lam, variant: str):
    return np.asarray(lam, dtype=float) * 10 ** DODGE.get(variant, 0.0)


def _lr_label(part: pd.DataFrame) -> str:
    lrs = sorted(set(pd.to_numeric(part["lr"], errors="coerce").dropna()))
    return f"lr {', '.join(f'{v:g}' for v in lrs)}" if lrs else ""


def plot_explosion_accuracy(runs: pd.DataFrame) -> Figure:
    """Accuracy after the last task against lambda, per variant; panels (arch, method) x optimizer.

    ``runs``: ``explosion_runs.csv`` (``ewcstab.explosion.gather_runs``). Lines: mean over the runs that
    did not diverge, error bars their 95% half-width (``ewcstab.explosion.summarize``, the same numbers
    as the summary table); small dots: single runs. Crosses at the bottom: lambdas where runs diverged,
    labelled with diverged/total runs.
    """
    summary = summarize(runs)
    one = per_run(runs)
    rows = _panel_rows(summary)
    optimizers = style.ordered(summary["optimizer"].unique(), OPTIMIZERS)
    fig, axes = style.new_figure(len(rows), len(optimizers), panel=(4.2, 3.2), sharey=True)
    used: set[str] = set()
    for i, (arch, method) in enumerate(rows):
        for j, opt in enumerate(optimizers):
            ax = axes[i][j]
            sel = (summary["arch"] == arch) & (summary["method"] == method) & (summary["optimizer"] == opt)
            s = summary[sel]
            if s.empty:  # this (arch, method) was not run with this optimizer
                ax.remove()
                continue
            r = one[(one["arch"] == arch) & (one["method"] == method) & (one["optimizer"] == opt)]
            for variant in style.ordered(s["variant"].unique(), style.VARIANTS):
                c = style.color_of(variant, style.VARIANT_COLORS)
                sv = s[s["variant"] == variant].sort_values("lam")
                rv = r[(r["variant"] == variant) & ~r["diverged"]]
                ax.scatter(_dodge(rv["lam"], variant), rv["final_mean_acc"], s=10, color=c, alpha=0.35, lw=0,
                           zorder=2)
                ok = sv[sv["mean_acc"].notna()]
                ax.errorbar(_dodge(ok["lam"], variant), ok["mean_acc"], yerr=ok["ci95"].fillna(0).to_numpy(),
                            fmt="-o", ms=4, lw=1.6, color=c, capsize=3, zorder=3, label=variant)
                used.add(variant)
                dv = sv[sv["n_diverged"] > 0]
                if len(dv):
                    x = _dodge(dv["lam"], variant)
                    ax.scatter(x, np.full(len(dv), BOTTOM), marker="x", s=40, color=c, lw=1.8, zorder=4,
                               transform=ax.get_xaxis_transform(), clip_on=False, gid="diverged")
                    for xi, k, n in zip(x, dv["n_diverged"], dv["n_runs"]):
                        ax.text(xi, COUNT_Y, f"{k}/{n}", color=c, fontsize="x-small", ha="center",
                                transform=ax.get_xaxis_transform(), gid="diverged-count")
                    used.add("diverged")
            style.log_axis(ax)
            ax.set_ylim(0, 1)
            style.percent_axis(ax.yaxis)
            ax.set_title(f"{SHORT_ARCH.get(arch, arch)}, {style.METHOD_NAMES.get(method, method)}: "
                         f"{opt} ({_lr_label(r)})", fontsize="medium")
            ax.set_xlabel(LAMBDA_LABEL if i == len(rows) - 1 else "")
            if j == 0:
                ax.set_ylabel(ACC_LABEL if len(rows) == 1 else f"{SHORT_ARCH.get(arch, arch)}\naccuracy after last task")
    n_runs = int(summary["n_runs"].max()) if len(summary) else 0
    fig.suptitle(f"Gradient explosion: accuracy against λ ({n_runs} seed{'s' if n_runs != 1 else ''} per point)")
    grey = "#444444"
    handles = [Line2D([], [], color=style.color_of(v, style.VARIANT_COLORS), marker="o", lw=1.6, label=v)
               for v in style.ordered(used - {"diverged"}, style.VARIANTS)]
    handles.append(Line2D([], [], color=grey, marker="o", ls="", ms=3, alpha=0.5, label="single run"))
    handles.append(Line2D([], [], color=grey, marker="o", lw=1.6,
                          label="mean ± 95% CI of the runs that did not diverge"))
    if "diverged" in used:
        handles.append(Line2D([], [], color=grey, marker="x", ls="", mew=1.8,
                              label="runs diverged (count diverged/runs, at the bottom)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize="small")
    return fig


def _boundaries(traces: pd.DataFrame) -> list[int]:
    """Global steps after which a new task starts (from the longest run in ``traces``)."""
    if traces.empty:
        return []
    longest = traces.groupby("source")["global_step"].max().idxmax()
    t = traces[traces["source"] == longest]
    ends = t.groupby("task")["global_step"].max().sort_index()
    return [int(v) for v in ends.iloc[:-1]]


def _smooth(y: np.ndarray) -> np.ndarray:
    """Rolling median (window about 1% of the trace, odd) to show the trend of a noisy norm."""
    w = max(1, len(y) // 100) | 1
    return pd.Series(y).rolling(w, center=True, min_periods=1).median().to_numpy()


def plot_explosion_traces(traces: pd.DataFrame) -> Figure:
    """Total gradient norm per optimizer step of the traced runs; panels arch x optimizer, line = variant.

    ``traces``: ``explosion_traces.csv`` (``ewcstab.explosion.gather_traces``). The norm is the full
    loss's (task + penalty) before clipping, so the clipped variant shows what clipping had to cut. Thin
    line: every step; thick: rolling median. Dotted verticals: task boundaries; dashed horizontal: the
    clipping threshold; a cross: the last recorded step of a run that diverged.
    """
    archs = style.ordered(traces["arch"].unique(), ARCHS)
    optimizers = style.ordered(traces["optimizer"].unique(), OPTIMIZERS)
    fig, axes = style.new_figure(len(archs), len(optimizers), panel=(4.6, 3.0))
    used: set[str] = set()
    for i, arch in enumerate(archs):
        for j, opt in enumerate(optimizers):
            ax = axes[i][j]
            part = traces[(traces["arch"] == arch) & (traces["optimizer"] == opt)]
            if part.empty:
                ax.remove()
                continue
            for b in _boundaries(part):
                ax.axvline(b + 0.5, color="#999999", ls=":", lw=1, zorder=1)
            for variant in style.ordered(part["variant"].unique(), style.VARIANTS):
                c = style.color_of(variant, style.VARIANT_COLORS)
                pv = part[part["variant"] == variant].sort_values("global_step")
                x, y = pv["global_step"].to_numpy(), pv["grad_norm"].to_numpy(float)
                y = np.where(y > 0, y, np.nan)  # log axis
                ax.plot(x, y, color=c, lw=0.5, alpha=0.35, zorder=2)
                ax.plot(x, _smooth(y), color=c, lw=1.6, zorder=3, label=variant)
                used.add(variant)
                if pv["diverged"].astype(bool).any():
                    finite = np.isfinite(y)
                    last = int(np.flatnonzero(finite)[-1]) if finite.any() else len(y) - 1
                    yl = y[last] if finite.any() else np.nanmax(part["grad_norm"])
                    ax.plot([x[last]], [yl], marker="x", ms=9, mew=2, color=c, ls="", zorder=5, gid="diverged")
                    used.add("diverged")
                clip = pv["clip_norm"].dropna()
                if len(clip):
                    ax.axhline(float(clip.iloc[0]), color=c, ls="--", lw=1, zorder=1, gid="clip_norm")
                    used.add("clip")
            ax.set_yscale("log")
            lam = ", ".join(f"{v:g}" for v in sorted(part["lam"].unique()))
            method = ", ".join(style.METHOD_NAMES.get(m, m) for m in sorted(part["method"].unique()))
            ax.set_title(f"{SHORT_ARCH.get(arch, arch)}, {opt}: λ = {lam}, {method}", fontsize="medium")
            ax.set_xlabel("optimizer step (all tasks)" if i == len(archs) - 1 else "")
            if j == 0:
                ax.set_ylabel("total gradient norm ‖g‖\n(before clipping, log scale)")
    fig.suptitle("Gradient explosion: gradient norm step by step, one run per variant at a large λ")
    grey = "#444444"
    handles = [Line2D([], [], color=style.color_of(v, style.VARIANT_COLORS), lw=1.6, label=v)
               for v in style.ordered(used - {"diverged", "clip"}, style.VARIANTS)]
    handles.append(Line2D([], [], color="#999999", ls=":", label="task boundary"))
    if "clip" in used:
        handles.append(Line2D([], [], color=style.VARIANT_COLORS["clipped"], ls="--", label="clipping threshold"))
    if "diverged" in used:
        handles.append(Line2D([], [], color=grey, marker="x", ls="", mew=2, label="diverged (last finite step)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize="small")
    return fig
