"""Figures of the paper's sections 2-3: the lambda search and the accuracy after each task.

- ``plot_lambda_search``: mean accuracy after the last task against lambda (log scale), one panel
  per importance method; every Optuna trial, original and stabilized overlaid, the final runs at
  the chosen lambda (mean and 95% CI), the lambda = 0 baseline and the paper's best point.
- ``plot_task_curves``: mean accuracy over tasks 1..t after learning task t, at the chosen lambda,
  with 95% bands over the final seeds, the lambda = 0 baseline, and the paper's curves dashed.
- ``plot_search_trials``: Optuna's view of each study, objective against lambda coloured by trial
  number, so one sees where the sampler went and when.
- ``plot_lambda_sweep``: mean accuracy after the last task against lambda on a fixed grid (the
  workflow's sweeps), one line per optimizer state with 95% bands, its best lambda marked, and the
  paper's best point.

Optimizer states (fresh: a new optimizer per run; carried: the Adam state of the run before, as the
authors' scripts ran) are told apart by line style and marker, variants by colour.

Each function draws one architecture (``arch``; optional when the data hold only one) and
returns the matplotlib Figure; nothing is saved (``style.save_figure`` does that).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ewcstab.figures import style
from ewcstab.figures.tables import STATE, final_at_best, last_task_rows, paper_task_curves, task_curves
from ewcstab.metrics import mean_ci95

ACC_LABEL = "mean test accuracy after the last task"
LAMBDA_LABEL = "λ, penalty strength (log scale)"
#: y position (axes fraction) where trials without a value (diverged early) are drawn.
BOTTOM = 0.03
#: Original drawn wider than stabilized, so that a curve hidden under the other still shows at its edges.
LINE_WIDTHS = {"original": 2.6, "stabilized": 1.4}
#: Legend entries of plot_lambda_search that are marker kinds, not variants.
_KINDS = {"complete", "pruned", "diverged", "final", "paper", "baseline"}
#: Line style and marker of each optimizer state where both are drawn (the paper's curves are dashed).
STATE_STYLES = {"carried": ("-", "o"), "fresh": (":", "^")}
STATE_NAMES = {"carried": "Adam state carried from the run before (as the authors ran)",
               "fresh": "fresh Adam per run"}


def state_styles(states) -> dict[str, tuple[str, str]]:
    """Line style and marker per optimizer state: ``STATE_STYLES`` where several states are drawn, solid
    with circles for a lone state."""
    states = sorted(set(states))
    return STATE_STYLES if len(states) > 1 else {s: ("-", "o") for s in states}


def setting_order(method: str, variant: str) -> tuple[int, int]:
    """Sort key of a (method, variant) setting: the order of ``style.METHODS`` then ``style.VARIANTS``,
    unknown names last."""
    return (style.METHODS.index(method) if method in style.METHODS else len(style.METHODS),
            style.VARIANTS.index(variant) if variant in style.VARIANTS else len(style.VARIANTS))


def pick_arch(df: pd.DataFrame, arch: str | None, what: str) -> str:
    """``arch`` if the data hold it; without one, the data's only arch."""
    archs = sorted(df["arch"].dropna().unique())
    if arch is None:
        if len(archs) != 1:
            raise ValueError(f"{what} hold archs {archs}: choose one with arch=")
        return archs[0]
    if arch not in archs:
        raise ValueError(f"no {what} for arch {arch!r} (present: {archs})")
    return arch


def _trial_masks(t: pd.DataFrame) -> dict[str, pd.Series]:
    diverged = t["diverged"].astype(bool)
    return {
        "complete": (t["state"] == "COMPLETE") & ~diverged,
        "pruned": (t["state"] == "PRUNED") & ~diverged,
        "diverged": diverged,
    }


def _finite(x) -> bool:
    return x is not None and not pd.isna(x) and math.isfinite(float(x))


def _arch_title(arch: str, n_tasks: int | None) -> str:
    name = style.ARCH_NAMES.get(arch, arch)
    return f"{name}, {n_tasks} tasks" if n_tasks else name


def _n_tasks(runs: pd.DataFrame | None, arch: str) -> int | None:
    if runs is None or runs.empty or "n_tasks" not in runs:
        return None
    sel = runs.loc[runs["arch"] == arch, "n_tasks"]
    return int(sel.max()) if len(sel) else None


def plot_lambda_search(
    trials: pd.DataFrame,
    runs: pd.DataFrame | None = None,
    table1: pd.DataFrame | None = None,
    arch: str | None = None,
) -> Figure:
    """Accuracy after the last task against lambda, one panel per method (paper sections 2-3).

    ``trials``: ``tables.read_trials`` output. ``runs``: ``continual_runs.csv`` (final runs at the
    chosen lambda as mean ± 95% CI, and the lambda = 0 baseline as a grey line and band).
    ``table1``: ``table1_continual.csv`` (the paper's best lambda and accuracy ± 95% CI as a star).
    Trials with lambda <= 0 (grid mode) cannot sit on the log axis; the baseline stands for them.
    """
    arch = pick_arch(trials, arch, "trials")
    t = trials[(trials["arch"] == arch) & (trials["lam"] > 0)]
    methods = style.ordered(t["method"].unique(), style.METHODS)
    fig, axes = style.new_panels(len(methods), sharey=True)
    finals = final_at_best(runs[runs["arch"] == arch]) if runs is not None else pd.DataFrame()
    styles = state_styles(finals[STATE] if len(finals) else [])
    bases: dict[str, tuple[float, float]] = {}
    if runs is not None:
        last = last_task_rows(runs[runs["arch"] == arch], "baseline")
        for state, part in last.groupby(STATE):
            bases[state] = mean_ci95(part.loc[~part["diverged"].astype(bool), "mean_acc"].dropna().to_numpy())
    used: set[str] = set()
    for ax, method in zip(axes, methods):
        tm = t[t["method"] == method]
        for variant in style.ordered(tm["variant"].unique(), style.VARIANTS):
            used.add(variant)
            c = style.color_of(variant, style.VARIANT_COLORS)
            used |= _draw_trials(ax, tm[tm["variant"] == variant], c)
            if len(finals):
                f = finals[(finals["method"] == method) & (finals["variant"] == variant)]
                for state, fs in f.groupby(STATE):
                    drawn = _draw_points(ax, fs["lam"], fs["mean_acc"], fs["ci95"], styles[state][1], 7, c,
                                         "final")
                    used |= drawn | ({f"final {state}"} if drawn else set())
            if table1 is not None and "paper_best_lambda" in table1:
                p = table1[(table1["arch"] == arch) & (table1["method"] == method) & (table1["variant"] == variant)]
                used |= _draw_points(ax, p["paper_best_lambda"], p["paper_mean_acc_last"], p["paper_ci95_last"],
                                     "*", 13, c, "paper")
        for state, base in bases.items():
            if _finite(base[0]):
                ax.axhline(base[0], color=style.BASELINE_COLOR, ls=_baseline_ls(state, styles), lw=1.5, zorder=1)
                if _finite(base[1]):
                    ax.axhspan(base[0] - base[1], base[0] + base[1], color=style.BASELINE_COLOR, alpha=0.12, lw=0)
                used |= {"baseline", f"baseline {state}"}
        style.log_axis(ax)
        ax.set_title(style.METHOD_NAMES.get(method, method))
        ax.set_xlabel(LAMBDA_LABEL)
        style.percent_axis(ax.yaxis)
        if style.first_in_row(ax):
            ax.set_ylabel(ACC_LABEL)
    fig.suptitle(f"Accuracy after the last task against λ: {_arch_title(arch, _n_tasks(runs, arch))}")
    _legend(fig, used, styles)
    return fig


def _baseline_ls(state: str, styles: dict[str, tuple[str, str]]) -> str:
    """The lambda = 0 line of the accuracy-vs-lambda figure: dotted, dash-dotted for fresh beside carried."""
    return "-." if len(styles) > 1 and state == "fresh" else ":"


def _draw_trials(ax, tv: pd.DataFrame, color: str) -> set[str]:
    """One study's trials: complete (filled, joined by a thin line along lambda), stopped by the
    pruner (open), diverged (crosses at the bottom). Returns the kinds drawn."""
    tv = tv.sort_values("lam")
    masks = _trial_masks(tv)
    done, div = tv[masks["complete"]], tv[masks["diverged"]]
    stopped = tv[masks["pruned"] & tv["value"].notna()]
    ax.plot(done["lam"], done["value"], "-", color=color, lw=1, alpha=0.5)
    ax.scatter(done["lam"], done["value"], s=28, color=color, edgecolor="white", linewidth=0.5, zorder=3)
    if len(stopped):
        ax.scatter(stopped["lam"], stopped["value"], s=28, facecolor="none", edgecolor=color, zorder=3)
    if len(div):
        ax.scatter(div["lam"], np.full(len(div), BOTTOM), marker="x", s=36, color=color, zorder=3,
                   transform=ax.get_xaxis_transform(), clip_on=False)
    return {k for k, part in (("complete", done), ("pruned", stopped), ("diverged", div)) if len(part)}


def _draw_points(ax, lam, mean, half, marker: str, size: float, color: str, kind: str) -> set[str]:
    """Mean ± 95% CI points at their lambda (final runs, the paper's best); skips undefined ones."""
    drawn = set()
    for x, y, h in zip(lam, mean, half):
        if _finite(x) and _finite(y) and x > 0:
            ax.errorbar(x, y, yerr=h if _finite(h) else None, fmt=marker, ms=size, color=color, mec="black",
                        mew=0.8, capsize=4, zorder=6 if kind == "paper" else 5)
            drawn.add(kind)
    return drawn


def _legend(fig: Figure, used: set[str], styles: dict[str, tuple[str, str]]) -> None:
    """One legend under the figure: colour = variant, marker = what a point is (only what is drawn)."""
    grey = "#444444"
    variants = [Line2D([], [], color=style.color_of(v, style.VARIANT_COLORS), lw=3, label=v)
                for v in style.ordered(used - _KINDS, style.VARIANTS)]
    kinds = [
        ("complete", Line2D([], [], ls="", marker="o", color=grey, label="search trial (mean of its seeds)")),
        ("pruned", Line2D([], [], ls="", marker="o", mfc="none", color=grey,
                          label="trial stopped by the pruner (accuracy when stopped)")),
        ("diverged", Line2D([], [], ls="", marker="x", color=grey, label="trial diverged (drawn at the bottom)")),
        ("final", Line2D([], [], ls="", marker="D", color=grey, mec="black", label="final runs at chosen λ: mean ± 95% CI")),
        ("paper", Line2D([], [], ls="", marker="*", ms=11, color=grey, mec="black", label="paper: best λ, accuracy ± 95% CI")),
        ("baseline", Line2D([], [], ls=":", lw=1.5, color=style.BASELINE_COLOR, label="λ = 0, final seeds: mean ± 95% CI")),
    ]
    handles = variants + [h for k, h in kinds if k in used and k not in ("final", "baseline")]
    for state, (ls, marker) in styles.items():
        if f"final {state}" in used:
            handles.append(Line2D([], [], ls="", marker=marker, color=grey, mec="black",
                                  label=f"final runs at chosen λ, {state}: mean ± 95% CI"))
        if f"baseline {state}" in used:
            handles.append(Line2D([], [], ls=_baseline_ls(state, styles), lw=1.5, color=style.BASELINE_COLOR,
                                  label=f"λ = 0, {state}: mean ± 95% CI"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize="small")



def plot_task_curves(runs: pd.DataFrame, paper: pd.DataFrame | None = None, arch: str | None = None) -> Figure:
    """Mean accuracy over tasks 1..t after task t at the chosen lambda, one panel per method.

    ``runs``: ``continual_runs.csv``; the final runs of each (method, variant) give the solid line
    and its 95% band over seeds, the baseline runs (lambda = 0) the grey one. ``paper``: the
    paper's ``paper_continual.csv``; its curve at its best lambda is dashed in the variant's colour
    and its lambda = 0 accuracy after the last task is an open square. Diverged runs are left out
    and counted in the panel.
    """
    arch = pick_arch(runs, arch, "runs")
    curves = task_curves(runs[runs["arch"] == arch], "final")
    base = task_curves(runs[runs["arch"] == arch], "baseline")
    methods = style.ordered(curves["method"].unique(), style.METHODS)
    if not methods:
        raise ValueError(f"no final runs for arch {arch!r}")
    ref = paper_task_curves(paper[paper["arch"] == arch]) if paper is not None else None
    styles = state_styles(curves[STATE])
    fig, axes = style.new_panels(len(methods), sharey=True)
    used: set[str] = set()
    for ax, method in zip(axes, methods):
        lams = []
        for state, part in base.groupby(STATE):
            ls, marker = styles.get(state, ("-", "o"))
            _line_band(ax, part, style.BASELINE_COLOR, ls, marker, alpha=0.12)
            used.add("baseline")
        for variant in style.ordered(curves.loc[curves["method"] == method, "variant"].unique(), style.VARIANTS):
            c = style.color_of(variant, style.VARIANT_COLORS)
            cv = curves[(curves["method"] == method) & (curves["variant"] == variant)]
            for state, part in cv.groupby(STATE):
                ls, marker = styles[state]
                _line_band(ax, part, c, ls, marker, lw=LINE_WIDTHS.get(variant, 1.8))
                used |= {variant, f"state {state}"}
                if part["n_diverged"].iloc[0]:
                    ax.text(0.02, 0.02 + 0.07 * (len(lams) + 1),
                            f"{variant}, {state}: {part['n_diverged'].iloc[0]} diverged runs left out",
                            transform=ax.transAxes, fontsize="x-small", color=c)
            lams.append(f"{variant} {cv['lam'].iloc[0]:.3g}")
            if ref is not None:
                pv = ref[(ref["method"] == method) & (ref["variant"] == variant)]
                if len(pv):
                    ax.plot(pv["after_task"], pv["mean_acc"], "--", color=c, lw=LINE_WIDTHS.get(variant, 1.8) * 0.8)
                    used.add("paper")
                p0 = paper[(paper["arch"] == arch) & (paper["method"] == method) & (paper["variant"] == variant)]
                for _, r in p0.iterrows():
                    if _finite(r.get("acc_lambda0")) and len(pv):
                        ax.plot(pv["after_task"].max(), r["acc_lambda0"], "s", mfc="none", mec=c, ms=7, mew=1.5)
                        used.add("paper0")
        ax.set_title(f"{style.METHOD_NAMES.get(method, method)}\nλ: {', '.join(lams)}", fontsize="medium")
        ax.set_xlabel("tasks learned, t")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        style.percent_axis(ax.yaxis)
        if style.first_in_row(ax):
            ax.set_ylabel("mean test accuracy on tasks 1..t")
    fig.suptitle(f"Accuracy after each task at the chosen λ: {_arch_title(arch, _n_tasks(runs, arch))}")
    grey = "#444444"
    variants = {u for u in used if u in style.VARIANTS}
    handles = [Line2D([], [], color=style.color_of(v, style.VARIANT_COLORS), lw=3, label=f"ours: {v}, mean ± 95% CI")
               for v in style.ordered(variants, style.VARIANTS)]
    if len(styles) > 1:
        handles += [Line2D([], [], color=grey, ls=ls, marker=marker, label=f"ours, {STATE_NAMES[state]}")
                    for state, (ls, marker) in styles.items() if f"state {state}" in used]
    if "baseline" in used:
        handles.append(Line2D([], [], color=style.BASELINE_COLOR, lw=3, label="ours: λ = 0 (no penalty)"))
    if "paper" in used:
        handles.append(Line2D([], [], color=grey, ls="--", label="paper, its best λ (20 runs)"))
    if "paper0" in used:
        handles.append(Line2D([], [], color=grey, ls="", marker="s", mfc="none", label="paper: λ = 0 after the last task"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize="small")
    return fig


def _line_band(ax, df: pd.DataFrame, color: str, ls: str, marker: str, alpha: float = 0.2, lw: float = 1.8) -> None:
    """Mean line with its 95% band (no band where the half-width is undefined, n = 1)."""
    df = df.sort_values("after_task")
    x, m, h = df["after_task"].to_numpy(), df["mean_acc"].to_numpy(float), df["ci95"].to_numpy(float)
    ax.plot(x, m, ls=ls, marker=marker, ms=4, color=color, lw=lw)
    if np.isfinite(h).any():
        ax.fill_between(x, m - h, m + h, color=color, alpha=alpha, lw=0)


def plot_search_trials(trials: pd.DataFrame, arch: str | None = None, cmap: str = "viridis") -> Figure:
    """Optuna's view of every study of one arch: objective against lambda, colour = trial number.

    One panel per (variant, method) that has trials (rows: variants, columns: methods; a missing
    combination is left out). Circles are complete trials, triangles trials stopped by the pruner
    (at their last reported value), crosses diverged trials (at the bottom); the best trial is ringed.
    """
    arch = pick_arch(trials, arch, "trials")
    t = trials[(trials["arch"] == arch) & (trials["lam"] > 0)]
    methods = style.ordered(t["method"].unique(), style.METHODS)
    variants = style.ordered(t["variant"].unique(), style.VARIANTS)
    fig, axes = style.new_figure(len(variants), len(methods), panel=(3.4, 2.8), sharey=True)
    norm = Normalize(vmin=0, vmax=max(1, int(t["number"].max())))
    colormap = colormaps[cmap]
    used: set[str] = set()
    kept = []
    for i, variant in enumerate(variants):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            tv = t[(t["method"] == method) & (t["variant"] == variant)]
            if tv.empty:
                ax.remove()
                continue
            kept.append(ax)
            masks = _trial_masks(tv)
            done, stopped, div = tv[masks["complete"]], tv[masks["pruned"] & tv["value"].notna()], tv[masks["diverged"]]
            for part, marker, kind in ((done, "o", "complete"), (stopped, "^", "pruned")):
                if len(part):
                    ax.scatter(part["lam"], part["value"], c=colormap(norm(part["number"])), marker=marker, s=34,
                               edgecolor="black", linewidth=0.4, zorder=3)
                    used.add(kind)
            if len(div):
                ax.scatter(div["lam"], np.full(len(div), BOTTOM), c=colormap(norm(div["number"])), marker="X", s=44,
                           edgecolor="black", linewidth=0.4, transform=ax.get_xaxis_transform(), clip_on=False, zorder=3)
                used.add("diverged")
            if len(done):
                best = done.loc[done["value"].idxmax()]
                ax.scatter([best["lam"]], [best["value"]], s=170, facecolor="none", edgecolor="#D62728", linewidth=1.6,
                           zorder=4)
                used.add("best")
            style.log_axis(ax)
            ax.set_title(f"{style.METHOD_NAMES.get(method, method)}, {variant}", fontsize="medium")
            ax.set_xlabel(LAMBDA_LABEL if i == len(variants) - 1 else "")
            style.percent_axis(ax.yaxis)
            if j == 0:
                ax.set_ylabel("objective: mean accuracy\nafter the last task")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=kept, label="trial number (order of sampling)",
                       shrink=0.9)
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    fig.suptitle(f"Optuna searches of λ, trial by trial: {_arch_title(arch, None)}")
    grey = "#888888"
    kinds = [
        ("complete", Line2D([], [], ls="", marker="o", color=grey, mec="black", label="complete trial")),
        ("pruned", Line2D([], [], ls="", marker="^", color=grey, mec="black", label="stopped by the pruner (last reported value)")),
        ("diverged", Line2D([], [], ls="", marker="X", color=grey, mec="black", label="diverged (drawn at the bottom)")),
        ("best", Line2D([], [], ls="", marker="o", ms=11, mfc="none", mec="#D62728", mew=1.6, label="best trial (chosen λ)")),
    ]
    handles = [h for k, h in kinds if k in used]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize="small")
    return fig


def plot_lambda_sweep(sweep: pd.DataFrame, paper: pd.DataFrame | None = None, arch: str | None = None) -> Figure:
    """Accuracy after the last task against lambda on a fixed grid, one panel per swept (method, variant).

    ``sweep``: the gathered sweep runs (``sweep_runs.csv``, role ``sweep``); one line per optimizer state,
    mean ± 95% band over the seeds at each lambda (diverged runs left out and counted), its best lambda
    (highest mean) marked with a ring and named in the legend. ``paper``: ``paper_continual.csv``; the
    paper's best lambda and accuracy ± 95% CI as a star. Lambda 0 cannot sit on the log axis: a sweep's
    lambda = 0 point is drawn as a horizontal line.
    """
    arch = pick_arch(sweep, arch, "sweep runs")
    points = final_at_best(sweep[sweep["arch"] == arch], role="sweep", by=("lam",))
    studies = list(points.groupby(["method", "variant"], sort=False).groups)
    studies.sort(key=lambda k: setting_order(*k))
    styles = state_styles(points[STATE])
    fig, axes = style.new_panels(len(studies), panel=(4.6, 3.4), sharey=True)
    for ax, (method, variant) in zip(axes, studies):
        c = style.color_of(variant, style.VARIANT_COLORS)
        handles = []
        part = points[(points["method"] == method) & (points["variant"] == variant)]
        for state, ps in part.groupby(STATE):
            ls, marker = styles[state]
            ps = ps.sort_values("lam")
            pos, zero = ps[ps["lam"] > 0], ps[ps["lam"] == 0]
            x, m, h = pos["lam"].to_numpy(), pos["mean_acc"].to_numpy(float), pos["ci95"].to_numpy(float)
            ax.plot(x, m, ls=ls, marker=marker, ms=4, color=c, lw=1.6)
            if np.isfinite(h).any():
                ax.fill_between(x, m - h, m + h, color=c, alpha=0.15, lw=0)
            for _, z in zero.iterrows():
                ax.axhline(z["mean_acc"], color=style.BASELINE_COLOR, ls=ls, lw=1.2)
            best = ps.loc[ps["mean_acc"].idxmax()]
            ax.plot(best["lam"], best["mean_acc"], "o", ms=12, mfc="none", mec=c, mew=1.5)
            diverged = int(ps["n_diverged"].sum())
            note = f", {diverged} diverged runs left out" if diverged else ""
            handles.append(Line2D([], [], color=c, ls=ls, marker=marker,
                                  label=f"{state}: best λ {best['lam']:.3g} ({best['mean_acc']:.4f}){note}"))
        if paper is not None:
            p = paper[(paper["arch"] == arch) & (paper["method"] == method) & (paper["variant"] == variant)]
            if _draw_points(ax, p["best_lambda"], p["mean_acc_last"], p["ci95_last"], "*", 13, c, "paper"):
                handles.append(Line2D([], [], ls="", marker="*", ms=11, color=c, mec="black",
                                      label="paper: best λ, accuracy ± 95% CI"))
        style.log_axis(ax)
        ax.set_title(f"{style.METHOD_NAMES.get(method, method)}, {variant}")
        ax.set_xlabel(LAMBDA_LABEL)
        style.percent_axis(ax.yaxis)
        if style.first_in_row(ax):
            ax.set_ylabel(ACC_LABEL)
        ax.legend(handles=handles, loc="lower left", fontsize="x-small")
    fig.suptitle(f"Accuracy against λ on a fixed grid: {_arch_title(arch, _n_tasks(sweep, arch))}")
    return fig


def plot_state_comparison(states: pd.DataFrame, paper: pd.DataFrame | None = None,
                          arch: str | None = None) -> Figure:
    """Accuracy after the last task per setting, carried against fresh optimizer state, beside the paper.

    ``states``: ``optimizer_states.csv`` (``ewcstab compare-states``: per setting the mean and 95% half-width
    of each state); one row per setting (λ = 0 left out: it is off the scale of the others and the table holds
    it), colour = penalty variant, marker = state (``STATE_STYLES``), the paper's mean ± 95% CI as a black
    star. The gaps between the states (0.005-0.015 at paper scale) are invisible on a task-curve axis that
    also holds λ = 0; here the axis spans the EWC settings only."""
    arch = pick_arch(states, arch, "optimizer-state comparisons")
    rows = states[(states["arch"] == arch) & (states["lam"] > 0)].copy()
    order = sorted(range(len(rows)), key=lambda i: setting_order(rows["method"].iloc[i], rows["variant"].iloc[i]))
    rows = rows.iloc[order].reset_index(drop=True)
    fig, axes = style.new_figure(1, 1, panel=(6.4, 0.55 * len(rows) + 1.2))
    ax = axes[0][0]
    offsets = {"paper": -0.25, "carried": 0.0, "fresh": 0.25}
    for i, r in rows.iterrows():
        c = style.color_of(r["variant"], style.VARIANT_COLORS)
        for state in ("carried", "fresh"):
            _, marker = STATE_STYLES[state]
            if _finite(r[f"acc_{state}"]):
                ax.errorbar(r[f"acc_{state}"], i + offsets[state], xerr=r[f"ci95_{state}"], fmt=marker, ms=6,
                            color=c, mfc=c if state == "carried" else "white", mec=c, capsize=3)
        if paper is not None:
            p = paper[(paper["arch"] == arch) & (paper["method"] == r["method"]) & (paper["variant"] == r["variant"])]
            for _, q in p.iterrows():
                if _finite(q["mean_acc_last"]):
                    ax.errorbar(q["mean_acc_last"], i + offsets["paper"], xerr=q["ci95_last"], fmt="*", ms=9,
                                color="black", capsize=3)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{style.METHOD_NAMES.get(m, m)}, {v}, λ {lam:g}"
                        for m, v, lam in zip(rows["method"], rows["variant"], rows["lam"])])
    ax.invert_yaxis()
    style.percent_axis(ax.xaxis)
    ax.set_xlabel("mean test accuracy on all tasks after the last (± 95% CI)")
    handles = [Line2D([], [], ls="", marker=STATE_STYLES[s][1], color="#444444",
                      mfc="#444444" if s == "carried" else "white", label=f"ours: {STATE_NAMES[s]}")
               for s in ("carried", "fresh")]
    handles.append(Line2D([], [], ls="", marker="*", ms=9, color="black", label="paper (20 runs)"))
    handles += [Line2D([], [], color=style.color_of(v, style.VARIANT_COLORS), lw=3, label=v)
                for v in style.ordered(set(rows["variant"]), style.VARIANTS)]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize="small", frameon=False)
    fig.suptitle(f"Optimizer state and the paper: {_arch_title(arch, None)}")
    return fig
