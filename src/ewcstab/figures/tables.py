"""The tidy tables the figures read, and the per-group statistics they draw.

Every statistic over runs is ``ewcstab.metrics.mean_ci95`` (mean and the paper's 95% half-width
t(0.975, n-1) * std / sqrt(n), ddof = 0), so figures, tables and notebooks agree to the digit.
Diverged runs are left out of accuracy statistics (their accuracy after the divergence is
undefined) and counted separately, as in Table 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ewcstab.metrics import mean_ci95

STUDY = ["arch", "method", "variant"]
#: The optimizer state column of the runs table (fresh | carried; tables written before it: fresh).
STATE = "optimizer_state"
PRUNING_GROUP = ["arch", "importance_data", "importance", "scope"]
#: Where the workflow writes each table, relative to the results folder.
RUNS_CSV = "tables/continual_runs.csv"
TABLE1_CSV = "tables/table1_continual.csv"
PRUNING_CSV = "tables/pruning_curves.csv"
TRIALS_GLOB = "search/*/*/*/trials.csv"


def results_dir(default: str | Path = "../results") -> Path:
    """The results folder: ``$EWCSTAB_RESULTS`` if set (notebooks, tests), else ``default``."""
    return Path(os.environ.get("EWCSTAB_RESULTS", default))


def read_trials(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate the ``trials.csv`` of several searches, adding arch, method and variant.

    The study is read from the file's folder, ``.../{arch}/{method}/{variant}/trials.csv`` (the
    workflow's layout). ``state`` is Optuna's (COMPLETE, PRUNED, FAIL); ``value`` of a PRUNED trial
    is the last intermediate value Optuna recorded (the mean accuracy after the task where it was
    stopped), NaN if it stopped before reporting; ``diverged`` marks pruned-by-divergence trials.
    """
    frames = []
    for path in map(Path, paths):
        arch, method, variant = path.parts[-4:-1]
        frames.append(pd.read_csv(path).assign(arch=arch, method=method, variant=variant))
    if not frames:
        raise ValueError("no trials.csv given")
    trials = pd.concat(frames, ignore_index=True)
    trials["diverged"] = trials.get("diverged", False)
    trials["diverged"] = trials["diverged"].fillna(False).astype(bool)
    trials["state"] = trials["state"].astype(str).str.upper()
    trials["value"] = pd.to_numeric(trials["value"], errors="coerce")
    return trials


def find_trials(results: str | Path) -> list[Path]:
    """Every search's trials.csv under a results folder, sorted (notebooks)."""
    return sorted(Path(results).glob(TRIALS_GLOB))


def with_state(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs table with its optimizer state column (older tables: every run fresh)."""
    return runs if STATE in runs else runs.assign(**{STATE: "fresh"})


def last_task_rows(runs: pd.DataFrame, role: str) -> pd.DataFrame:
    """One row per run of ``role`` (final | baseline | sweep): its mean accuracy after its last task."""
    sel = with_state(runs)
    sel = sel[(sel["role"] == role) & (sel["after_task"] == sel["n_tasks"])]
    return sel.copy()


def final_at_best(runs: pd.DataFrame, role: str = "final", by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per study and optimizer state (and the columns ``by``, e.g. lam for a sweep): lambda of the runs,
    runs, diverged runs, mean accuracy after the last task and its 95% half-width over the runs that did
    not diverge."""
    keys = [*STUDY, STATE, *by]
    rows = []
    for key, part in last_task_rows(runs, role).groupby(keys, sort=True):
        ok = part[~part["diverged"].astype(bool)]
        mean, half = mean_ci95(ok["mean_acc"].dropna().to_numpy())
        rows.append({**dict(zip(keys, key)), "lam": float(part["lam"].iloc[0]), "n_runs": len(part),
                     "n_diverged": int(part["diverged"].astype(bool).sum()), "mean_acc": mean, "ci95": half})
    return pd.DataFrame(rows, columns=[*dict.fromkeys([*keys, "lam"]), "n_runs", "n_diverged", "mean_acc", "ci95"])


def task_curves(runs: pd.DataFrame, role: str = "final") -> pd.DataFrame:
    """Mean accuracy after each task with its 95% half-width over the runs of ``role`` that did not
    diverge, per study (the baseline: per arch) and optimizer state (columns arch, method, variant,
    optimizer_state, lam, after_task, n_runs, n_diverged, mean_acc, ci95)."""
    runs = with_state(runs)
    sel = runs[runs["role"] == role]
    keys = ["arch", STATE] if role == "baseline" else [*STUDY, STATE]
    rows = []
    for key, part in sel.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        diverged = part.groupby("source")["diverged"].first().astype(bool)
        ok = part[part["source"].isin(diverged.index[~diverged])]
        for t, at in ok.groupby("after_task", sort=True):
            mean, half = mean_ci95(at["mean_acc"].dropna().to_numpy())
            rows.append({**dict(zip(keys, key)), "lam": float(part["lam"].iloc[0]), "after_task": int(t),
                         "n_runs": len(at), "n_diverged": int(diverged.sum()), "mean_acc": mean, "ci95": half})
    cols = [*keys, "lam", "after_task", "n_runs", "n_diverged", "mean_acc", "ci95"]
    return pd.DataFrame(rows, columns=cols)


def paper_task_curves(paper: pd.DataFrame) -> pd.DataFrame:
    """The paper's mean accuracy after each task at its best lambda (``paper_continual.csv``'s
    ';'-joined ``mean_acc_after_each_task``), long format: arch, method, variant, after_task, mean_acc."""
    rows = []
    for _, r in paper.iterrows():
        if pd.isna(r["mean_acc_after_each_task"]):
            continue
        for t, v in enumerate(str(r["mean_acc_after_each_task"]).split(";"), start=1):
            rows.append({"arch": r["arch"], "method": r["method"], "variant": r["variant"],
                         "after_task": t, "mean_acc": float(v)})
    return pd.DataFrame(rows, columns=[*STUDY, "after_task", "mean_acc"])


def pruning_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy and 95% half-width per (arch, importance_data, importance, scope, sparsity).

    Accepts either the per-network table (one row per seed: ``accuracy``) or an already averaged
    one (``mean_acc`` and optionally ``ci95``), so both the gathered curves and the pruning
    summary can be drawn.
    """
    if "accuracy" in curves.columns:
        rows = []
        for key, part in curves.groupby([*PRUNING_GROUP, "sparsity"], sort=True):
            mean, half = mean_ci95(part["accuracy"].to_numpy())
            rows.append((*key, len(part), mean, half))
        return pd.DataFrame(rows, columns=[*PRUNING_GROUP, "sparsity", "n_runs", "mean_acc", "ci95"])
    if "mean_acc" not in curves.columns:
        raise ValueError("pruning curves need an 'accuracy' (per network) or 'mean_acc' (averaged) column")
    out = curves.copy()
    if "ci95" not in out.columns:
        out["ci95"] = np.nan
    return out.sort_values([*PRUNING_GROUP, "sparsity"]).reset_index(drop=True)
