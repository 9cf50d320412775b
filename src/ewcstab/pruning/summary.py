"""Summaries over networks: mean pruning curves, sparsity thresholds, and the paper beside ours.

Mean curve: per (arch, importance_data, importance, scope, sparsity), the mean accuracy over
networks and its 95% half-width t(0.975, n-1) * std / sqrt(n) (numpy's std, ddof = 0, as the
paper; ``ewcstab.metrics.mean_ci95``).

Threshold at tolerance d (absolute accuracy, d = 0.01 and 0.05 by default): the largest sparsity
s such that the mean accuracy stays within d of the unpruned network at *every* grid point up to
s, i.e. max { s : acc(s') >= acc(0) - d for all s' <= s }. "Stays" (first crossing) rather than
"the last grid point within d": a curve that recovers for an instant after dropping out does not
move the threshold. The threshold is a grid value, so it depends on the grid: the paper's
published table (``paper_pruning.csv``) lists only the sparsities 0, 0.1, ..., 0.9, 0.95, 0.98,
hence the paper's threshold is computed over those, and ours is given both over our full grid and
over the paper's sparsities (directly comparable with the paper's).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ewcstab.metrics import mean_ci95
from ewcstab.pruning.experiment import CURVE_COLUMNS

GROUP = ["arch", "importance_data", "importance", "scope"]
TOLERANCES = (0.01, 0.05)
COMPARE_AT = (0.5, 0.7, 0.8, 0.9, 0.95)
PAPER_COLUMNS = ["scope", "importance", "sparsity", "mean_acc", "ci95", "n_runs"]
#: Decimals used to match sparsities across tables (grids are multiples of 1e-6 at the finest).
_KEY_DECIMALS = 9


def read_curves(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate per-network curve tables; refuses a network (group, seed) given twice."""
    frames = []
    for path in paths:
        df = pd.read_csv(path)
        missing = [c for c in CURVE_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: not a pruning curve table, columns {missing} are missing")
        frames.append(df)
    if not frames:
        raise ValueError("no curve tables given")
    curves = pd.concat(frames, ignore_index=True)
    dup = curves.duplicated(GROUP + ["seed", "sparsity"])
    if dup.any():
        row = curves[dup].iloc[0]
        raise ValueError(f"network given twice: {dict(row[GROUP + ['seed']])}")
    return curves


def summarise_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy and 95% half-width over networks at every sparsity (columns GROUP, sparsity,
    n_runs, mean_acc, ci95, seeds)."""
    rows = []
    for key, part in curves.groupby(GROUP + ["sparsity"], sort=True):
        mean, half = mean_ci95(part["accuracy"].to_numpy())
        rows.append((*key, len(part), mean, half, " ".join(str(s) for s in sorted(part["seed"]))))
    return pd.DataFrame(rows, columns=GROUP + ["sparsity", "n_runs", "mean_acc", "ci95", "seeds"])


def threshold_sparsity(sparsity: np.ndarray, acc: np.ndarray, tolerance: float) -> float:
    """max { s : acc(s') >= acc(0) - tolerance for every s' <= s } on the given grid (module docstring).

    ``sparsity`` must include 0. A tiny slack (1e-12) absorbs float rounding in acc(0) - tolerance.
    """
    order = np.argsort(sparsity, kind="stable")
    s, a = np.asarray(sparsity, dtype=float)[order], np.asarray(acc, dtype=float)[order]
    if s.size == 0 or s[0] != 0.0:
        raise ValueError("the curve must contain sparsity 0 (the unpruned network)")
    ok = a >= a[0] - tolerance - 1e-12
    failed = np.flatnonzero(~ok)
    return float(s[-1] if failed.size == 0 else s[failed[0] - 1])


def read_paper(path: str | Path) -> pd.DataFrame:
    """The paper's pruning table (docs/protocol.md 'Files here': scope, importance, sparsity, mean_acc, ci95, n_runs)."""
    paper = pd.read_csv(path)
    missing = [c for c in PAPER_COLUMNS if c not in paper.columns]
    if missing:
        raise ValueError(f"{path}: not the paper's pruning table, columns {missing} are missing")
    return paper


def _key(values: pd.Series | np.ndarray) -> np.ndarray:
    return np.round(np.asarray(values, dtype=float), _KEY_DECIMALS)


def threshold_column(value: str, tolerance: float) -> str:
    """Column of the threshold table holding ``value`` (threshold | threshold_paper_grid |
    paper_threshold) at ``tolerance``: e.g. threshold_0.01."""
    return f"{value}_{tolerance:g}"


THRESHOLD_VALUES = ("threshold", "threshold_paper_grid", "paper_threshold")


def thresholds_table(
    summary: pd.DataFrame, paper: pd.DataFrame | None = None, tolerances: Iterable[float] = TOLERANCES
) -> pd.DataFrame:
    """One row per curve (GROUP): our thresholds and the paper's at every tolerance d.

    Columns: GROUP, n_runs, acc_unpruned, paper_acc_unpruned, then per d: threshold_d (our full
    grid), threshold_paper_grid_d (our mean curve at the paper's sparsities only), paper_threshold_d
    (the paper's table, over its sparsities); last paper_grid, the sparsities the paper lists. The
    paper's values are matched on (importance, scope); its setting is arch mlp, importance data test.
    """
    tolerances = list(tolerances)
    rows = []
    for key, part in summary.groupby(GROUP, sort=True):
        importance, scope = key[2], key[3]
        s, a = part["sparsity"].to_numpy(), part["mean_acc"].to_numpy()
        row = dict(zip(GROUP, key), n_runs=int(part["n_runs"].min()), acc_unpruned=float(a[s == 0.0][0]))
        ref = None if paper is None else paper[(paper["importance"] == importance) & (paper["scope"] == scope)]
        has_ref = ref is not None and len(ref) > 0
        if has_ref:
            ps, pa = ref["sparsity"].to_numpy(dtype=float), ref["mean_acc"].to_numpy(dtype=float)
            on_grid = np.isin(_key(s), _key(ps))
        row["paper_acc_unpruned"] = float(pa[ps == 0.0][0]) if has_ref else np.nan
        for tol in tolerances:
            row[threshold_column("threshold", tol)] = threshold_sparsity(s, a, tol)
            row[threshold_column("threshold_paper_grid", tol)] = (
                threshold_sparsity(s[on_grid], a[on_grid], tol) if has_ref else np.nan
            )
            row[threshold_column("paper_threshold", tol)] = threshold_sparsity(ps, pa, tol) if has_ref else np.nan
        row["paper_grid"] = " ".join(f"{v:g}" for v in np.sort(ps)) if has_ref else ""
        rows.append(row)
    return pd.DataFrame(rows)


def tolerances_of(thresholds: pd.DataFrame) -> list[float]:
    """The tolerances a threshold table holds, read back from its column names."""
    prefix = "paper_threshold_"
    return [float(c[len(prefix):]) for c in thresholds.columns if c.startswith(prefix)]


def compare_at(
    summary: pd.DataFrame, paper: pd.DataFrame | None = None, sparsities: Iterable[float] = COMPARE_AT
) -> pd.DataFrame:
    """Our mean accuracy (and half-width) at selected sparsities beside the paper's, one row per
    (GROUP, sparsity); paper columns are NaN where the paper lists no value."""
    wanted = _key(list(sparsities))
    ours = summary[np.isin(_key(summary["sparsity"]), wanted)].copy()
    ours["_key"] = _key(ours["sparsity"])
    out = ours[GROUP + ["sparsity", "n_runs", "mean_acc", "ci95", "_key"]]
    if paper is not None:
        ref = paper.assign(_key=_key(paper["sparsity"]))[["importance", "scope", "_key", "mean_acc", "ci95"]]
        ref = ref.rename(columns={"mean_acc": "paper_mean_acc", "ci95": "paper_ci95"})
        out = out.merge(ref, on=["importance", "scope", "_key"], how="left")
    else:
        out = out.assign(paper_mean_acc=np.nan, paper_ci95=np.nan)
    return out.drop(columns="_key").reset_index(drop=True)


def _fmt(value: object, digits: int = 4) -> str:
    if isinstance(value, (float, np.floating)):
        return "n/a" if np.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(df: pd.DataFrame, columns: list[str], headers: list[str] | None = None) -> str:
    """A GitHub-flavoured markdown table of ``columns`` (no extra dependency)."""
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def _pm(mean: float, half: float) -> str:
    """'mean ± half-width', 'mean' without a half-width, 'n/a' without a mean."""
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" if np.isnan(half) else f"{mean:.4f} ± {half:.4f}"


def _threshold_columns(thresholds: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Columns of the threshold table shown to readers, and their headers."""
    cols, heads = list(GROUP), ["arch", "importance data", "importance", "scope"]
    for tol in tolerances_of(thresholds):
        for value, head in zip(THRESHOLD_VALUES, ("ours", "ours (paper grid)", "paper")):
            cols.append(threshold_column(value, tol))
            heads.append(f"{head}, d={tol:g}")
    return cols, heads


def thresholds_display(thresholds: pd.DataFrame) -> pd.DataFrame:
    """Table 2 as strings (the LaTeX table): thresholds at each tolerance, ours and the paper's."""
    cols, heads = _threshold_columns(thresholds)
    return pd.DataFrame({h: [_fmt(v) for v in thresholds[c]] for c, h in zip(cols, heads)})


def thresholds_latex(thresholds: pd.DataFrame) -> str:
    """Table 2 in LaTeX (booktabs)."""
    from ewcstab import latex

    caption = ("Pruning thresholds: the largest fraction of parameters pruned (lowest importance first) at which the "
               "mean test accuracy stays within d of the unpruned network's, per importance and scope.")
    grid = thresholds["paper_grid"].iloc[0] if len(thresholds) and thresholds["paper_grid"].iloc[0] else "n/a"
    notes = (f"ours: over our full sparsity grid; ours (paper grid) and paper: over the sparsities the paper's "
             f"table lists ({grid}), directly comparable. The paper's setting is the MLP with importances on the "
             "test set.")
    return latex.to_latex(thresholds_display(thresholds), caption, "tab:pruning-thresholds", notes)


def thresholds_markdown(thresholds: pd.DataFrame, comparison: pd.DataFrame | None = None) -> str:
    """The threshold table (ours vs the paper) and, optionally, accuracies at selected sparsities."""
    parts = [
        "# Pruning by weight importance: sparsity thresholds",
        "",
        "Threshold at tolerance d: the largest sparsity up to which the mean test accuracy stays within d "
        "(absolute) of the unpruned network's. `ours` uses our full grid; `ours (paper grid)` and `paper` use "
        "only the sparsities listed in the paper's table "
        f"({thresholds['paper_grid'].iloc[0] if len(thresholds) and thresholds['paper_grid'].iloc[0] else 'n/a'}), "
        "so they are directly comparable; the paper's setting is arch mlp with importances on the test set.",
        "",
    ]
    cols, heads = _threshold_columns(thresholds)
    parts.append(markdown_table(thresholds, cols, heads))
    if comparison is not None and len(comparison):
        parts += ["", "## Mean test accuracy at selected sparsities (± 95% half-width)", ""]
        comp = comparison.assign(
            ours=[_pm(m, c) for m, c in zip(comparison["mean_acc"], comparison["ci95"])],
            paper=[_pm(m, c) for m, c in zip(comparison["paper_mean_acc"], comparison["paper_ci95"])],
        )
        heads = ["arch", "importance data", "importance", "scope", "sparsity", "networks", "ours", "paper"]
        parts.append(markdown_table(comp, GROUP + ["sparsity", "n_runs", "ours", "paper"], heads))
    return "\n".join(parts) + "\n"
