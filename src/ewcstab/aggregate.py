"""Run records -> tidy tables (pandas), with the paper's numbers beside ours.

``ewcstab gather``: JSON run records -> one long-format CSV, one row per run and task
(the mean accuracy after that task). ``ewcstab table``: that CSV plus the searches'
best lambdas -> Table 1 (CSV, Markdown and LaTeX): per (arch, method, variant) the best lambda,
mean accuracy after the last task with its 95% half-width (t(0.975, n-1) * std / sqrt(n),
ddof = 0, as the paper), runs, diverged runs, the lambda = 0 baseline and the per-task
curve; the paper's columns come from its reference CSV, and a note says where the paper
has no number.
"""

from __future__ import annotations

import pandas as pd

from ewcstab.io import read_json
from ewcstab.metrics import mean_ci95

KEYS = ["arch", "method", "variant"]


def gather_records(paths: list[str], role: str) -> pd.DataFrame:
    """One row per (run, after_task); diverged runs keep rows with NaN accuracy after the divergence."""
    rows = []
    for path in paths:
        rec = read_json(path)
        cfg = rec["config"]
        for t, mean in enumerate(rec["mean_acc_after_task"], start=1):
            rows.append({
                "arch": cfg["arch"], "sequence": cfg["sequence"], "method": cfg["method"],
                "variant": cfg["variant"], "lam": cfg["lam"], "seed": rec["seed"], "role": role,
                "after_task": t, "n_tasks": len(rec["tasks"]), "mean_acc": mean,
                "diverged": rec["diverged"], "train_seconds": sum(rec["train_seconds"]), "source": str(path),
            })
    return pd.DataFrame(rows)


def _curve(df: pd.DataFrame) -> str:
    means = df.groupby("after_task")["mean_acc"].mean().sort_index()
    return ";".join(f"{v:.4f}" for v in means)


def continual_table(runs: pd.DataFrame, best: list[dict], paper: pd.DataFrame | None) -> pd.DataFrame:
    """Table 1: one row per searched (arch, method, variant)."""
    final = runs[runs["role"] == "final"]
    baseline = runs[runs["role"] == "baseline"]
    rows = []
    for b in best:
        key = (b["arch"], b["method"], b["variant"])
        sel = final[(final["arch"] == key[0]) & (final["method"] == key[1]) & (final["variant"] == key[2])]
        per_run = sel[sel["after_task"] == sel["n_tasks"]]
        ok = per_run[~per_run["diverged"]]
        mean, ci = mean_ci95(ok["mean_acc"].to_numpy())
        base = baseline[(baseline["arch"] == key[0]) & (baseline["after_task"] == baseline["n_tasks"])]
        base_mean, base_ci = mean_ci95(base["mean_acc"].dropna().to_numpy())
        rows.append({
            "arch": key[0], "method": key[1], "variant": key[2], "best_lambda": b["best_lambda"],
            "n_runs": len(per_run), "n_diverged": int(per_run["diverged"].sum()),
            "mean_acc_last": mean, "ci95_last": ci, "acc_lambda0": base_mean, "ci95_lambda0": base_ci,
            "mean_acc_after_each_task": _curve(sel[~sel["source"].isin(per_run[per_run["diverged"]]["source"])]),
            "search_mode": b.get("mode"), "search_trials": sum(b.get("n_trials", {}).values()),
        })
    table = pd.DataFrame(rows)
    return add_paper_columns(table, paper)


def add_paper_columns(table: pd.DataFrame, paper: pd.DataFrame | None) -> pd.DataFrame:
    cols = {"best_lambda": "paper_best_lambda", "mean_acc_last": "paper_mean_acc_last",
            "ci95_last": "paper_ci95_last", "acc_lambda0": "paper_acc_lambda0",
            "mean_acc_after_each_task": "paper_mean_acc_after_each_task", "n_runs": "paper_n_runs"}
    if paper is None or table.empty:
        for c in cols.values():
            table[c] = pd.NA
        table["paper_note"] = "paper reference not given"
        return table
    ref = paper[KEYS + list(cols)].rename(columns=cols)
    out = table.merge(ref, on=KEYS, how="left")
    out["paper_note"] = ""
    out.loc[out["paper_mean_acc_last"].isna(), "paper_note"] = "not in the paper"
    out.loc[out["paper_mean_acc_last"].notna() & out["paper_acc_lambda0"].isna(), "paper_note"] = (
        "paper grid has no lambda = 0"
    )
    return out


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as strings: ours and the paper's side by side (the Markdown and LaTeX tables)."""
    show = table.copy()
    fmt = lambda v, d=4: "n/a" if pd.isna(v) else f"{v:.{d}f}"  # noqa: E731
    show["ours: acc (95% CI)"] = [f"{fmt(m)} ± {fmt(c)}" for m, c in zip(show["mean_acc_last"], show["ci95_last"])]
    show["paper: acc (95% CI)"] = [
        "n/a" if pd.isna(m) else f"{fmt(m)} ± {fmt(c)}" for m, c in zip(show["paper_mean_acc_last"], show["paper_ci95_last"])
    ]
    show["ours: lambda"] = [f"{v:.4g}" for v in show["best_lambda"]]
    show["paper: lambda"] = ["n/a" if pd.isna(v) else f"{v:g}" for v in show["paper_best_lambda"]]
    show["ours: lambda=0"] = [fmt(v) for v in show["acc_lambda0"]]
    show["paper: lambda=0"] = [fmt(v) for v in show["paper_acc_lambda0"]]
    cols = ["arch", "method", "variant", "ours: lambda", "paper: lambda", "ours: acc (95% CI)", "paper: acc (95% CI)",
            "n_runs", "n_diverged", "ours: lambda=0", "paper: lambda=0", "paper_note"]
    return show[cols].rename(columns={"n_runs": "runs", "n_diverged": "diverged", "paper_note": "note"})


def to_markdown(table: pd.DataFrame) -> str:
    return display_table(table).to_markdown(index=False) + "\n"


TABLE1_CAPTION = (
    "Best lambda and mean accuracy over all tasks after the last task (± 95% half-width over the final runs) "
    "per architecture, importance method and EWC variant, beside the paper's numbers."
)


def to_latex(table: pd.DataFrame) -> str:
    from ewcstab import latex

    notes = ("95% half-width: t(0.975, n-1) · std / sqrt(n), ddof 0. Diverged runs are counted and left out "
             "of the accuracy. lambda=0: the same runs without the EWC penalty.")
    return latex.to_latex(display_table(table), TABLE1_CAPTION, "tab:continual", notes)
