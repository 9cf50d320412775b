"""The gradient-explosion study: where plain EWC blows up, and what stabilizing or clipping does.

The paper (Kutalev & Lapina, arXiv:2109.10021, Section 2) says plain EWC becomes unstable in deeper
networks with convolutional and self-attention layers: once the penalty's step gain
kappa_i = 2 * alpha * c_i (c = lambda * Omega for the original penalty) reaches 2, a plain gradient step
overshoots the anchor by more than the distance it started from and the weights oscillate with growing
amplitude. The stabilized penalty c = 0.5 * lambda * Omega / (alpha * lambda * Omega + 1) keeps kappa < 1
for every lambda; clipping the total gradient norm (variant ``clipped``) bounds each step instead, which
the paper says hides the explosion but throws gradient information away.

The workflow (``workflow/rules/explosion.smk``) sweeps lambda over several orders of magnitude for each
arch, method, variant (original, stabilized, clipped), optimizer (adam, sgd) and seed, one ``ewcstab run``
per point; every run record carries per-task telemetry (``ewcstab.telemetry``). This module turns the
records into tidy tables:

- ``gather_runs``: one row per run and task: the study's axes, the run's outcome (diverged, in which
  task and step, final accuracy as NaN when diverged: never a number standing in for one) and the task's
  telemetry (gradient norms, penalty share, kappa, distance to the anchor, clipping).
- ``summarize``: one row per (arch, method, variant, optimizer, lambda): runs, diverged runs, mean final
  accuracy of the runs that did not diverge with its 95% half-width (``metrics.mean_ci95``, the paper's),
  the largest gradient norm and kappa seen, and the fraction of steps clipping fired.
- ``gather_traces``: the per-step gradient norms of the traced runs (``ewcstab run --trace``), long format.

CLI (``ewcstab.cli.explosion``): ``ewcstab explosion-gather``, ``explosion-summary``, ``explosion-traces``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ewcstab.io import read_json
from ewcstab.metrics import mean_ci95

#: The study's axes: one summary row per GROUP, one run per GROUP + seed.
GROUP = ["arch", "method", "variant", "optimizer", "lam"]
RUN_KEY = [*GROUP, "seed"]

#: Per-task telemetry keys (``ewcstab.telemetry.TaskMonitor.summary``), in a fixed column order. The
#: task-level divergence keys are renamed (``task_`` prefix) so they do not clash with the run's.
TELEMETRY = (
    "steps", "loss_first", "loss_last", "loss_max",
    "grad_norm_mean", "grad_norm_p50", "grad_norm_p90", "grad_norm_p99", "grad_norm_max",
    "task_grad_norm_p50", "task_grad_norm_max", "penalty_grad_norm_p50", "penalty_grad_norm_max",
    "penalty_share_p50", "penalty_share_p90", "penalty_share_p99", "penalty_share_max",
    "nonfinite_grad_steps", "kappa_max", "kappa_frac_ge1", "kappa_frac_ge2",
    "anchor_dist_mean", "anchor_dist_max", "clip_norm", "clipped_steps", "clipped_fraction",
)
TASK_DIVERGENCE = {"diverged": "task_diverged", "diverged_step": "task_diverged_step",
                   "divergence_reason": "task_divergence_reason"}

RUN_COLUMNS = [
    "arch", "sequence", "method", "variant", "optimizer", "lr", "alpha", "lam", "seed", "n_tasks",
    "task", "trained", "mean_acc_after_task", "final_mean_acc",
    "diverged", "diverged_task", "diverged_step", "divergence_reason", "wall_seconds",
    *TELEMETRY, *TASK_DIVERGENCE.values(), "source",
]
SUMMARY_COLUMNS = [
    *GROUP, "n_runs", "n_diverged", "mean_acc", "ci95", "min_acc", "max_acc", "diverged_task_min",
    "grad_norm_p99_median", "grad_norm_max", "kappa_max", "kappa_frac_ge2_max", "penalty_share_p50_median",
    "nonfinite_grad_steps", "clipped_fraction",
]
TRACE_COLUMNS = [
    "arch", "method", "variant", "optimizer", "lam", "seed", "task", "step", "global_step",
    "loss", "task_grad_norm", "penalty_grad_norm", "grad_norm", "clip_norm",
    "diverged", "diverged_task", "diverged_step", "source",
]


def _num(value: object) -> float:
    """A JSON number, or NaN for null (a non-finite or undefined value in the record)."""
    return math.nan if value is None else float(value)


def run_rows(rec: dict, source: str = "") -> list[dict]:
    """One row per task of the run's sequence (tasks after a divergence: ``trained`` False, NaN telemetry)."""
    cfg = rec["config"]
    div = rec.get("diverged_at") or {}
    diverged = bool(rec["diverged"])
    final = math.nan if diverged else _num(rec.get("final_mean_acc"))
    telemetry = {int(t["task"]): t for t in rec.get("telemetry") or []}
    means = rec.get("mean_acc_after_task") or []
    rows = []
    for t in range(1, len(rec["tasks"]) + 1):
        tel = telemetry.get(t, {})
        row = {
            "arch": cfg["arch"], "sequence": cfg.get("sequence"), "method": cfg["method"],
            "variant": cfg["variant"], "optimizer": cfg.get("optimizer", "adam"), "lr": cfg.get("lr"),
            "alpha": cfg.get("alpha"), "lam": float(cfg["lam"]), "seed": int(rec["seed"]),
            "n_tasks": len(rec["tasks"]), "task": t,
            "trained": t in telemetry if telemetry else t <= len(means) and means[t - 1] is not None,
            "mean_acc_after_task": _num(means[t - 1]) if t <= len(means) else math.nan,
            "final_mean_acc": final, "diverged": diverged,
            "diverged_task": div.get("task"), "diverged_step": div.get("step"),
            "divergence_reason": div.get("reason"), "wall_seconds": rec.get("wall_seconds"),
            "source": source,
        }
        for key in TELEMETRY:
            row[key] = _num(tel.get(key))
        for key, name in TASK_DIVERGENCE.items():
            row[name] = tel.get(key)
        rows.append(row)
    return rows


def gather_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Run records -> the tidy runs table (``RUN_COLUMNS``), one row per run and task."""
    rows = [row for p in paths for row in run_rows(read_json(p), str(p))]
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    return df.sort_values([*RUN_KEY, "task"], kind="stable").reset_index(drop=True)


def per_run(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its axes, final accuracy (NaN when diverged), divergence, and the maximum over its
    tasks of each telemetry column (clipped steps and steps summed, to weigh the clipped fraction)."""
    tel_max = ["grad_norm_p99", "grad_norm_max", "kappa_max", "kappa_frac_ge2", "penalty_share_p50"]
    agg = {
        "final_mean_acc": ("final_mean_acc", "first"), "diverged": ("diverged", "first"),
        "diverged_task": ("diverged_task", "first"), "diverged_step": ("diverged_step", "first"),
        "lr": ("lr", "first"), "n_tasks": ("n_tasks", "first"),
        "steps": ("steps", "sum"), "clipped_steps": ("clipped_steps", lambda s: s.sum(min_count=1)),
        "nonfinite_grad_steps": ("nonfinite_grad_steps", "sum"),
        **{c: (c, "max") for c in tel_max},
    }
    out = runs.groupby([*RUN_KEY, "source"], sort=True, dropna=False).agg(**agg).reset_index()
    out["diverged"] = out["diverged"].astype(bool)
    return out


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """The summary table (``SUMMARY_COLUMNS``): one row per (arch, method, variant, optimizer, lambda).

    mean_acc, ci95: mean final accuracy over the runs that did not diverge and its 95% half-width
    t(0.975, n-1) * std / sqrt(n) (ddof 0; NaN for one run, both NaN when every run diverged);
    min_acc, max_acc over the same runs. Diverged runs are counted in n_diverged and left out of
    the accuracy (their accuracy after the divergence is undefined). grad_norm_max, kappa_max,
    kappa_frac_ge2_max: the largest over all runs and tasks (finite values; a diverged run's last
    finite ones count); grad_norm_p99_median, penalty_share_p50_median: median over runs of each run's
    largest per-task value; clipped_fraction: clipped steps / steps over all runs (NaN unless clipped).
    """
    runs_1 = per_run(runs)
    rows = []
    for key, part in runs_1.groupby(GROUP, sort=True):
        ok = part.loc[~part["diverged"], "final_mean_acc"].dropna().to_numpy()
        mean, half = mean_ci95(ok)
        clipped = part["clipped_steps"].sum(min_count=1)
        rows.append({
            **dict(zip(GROUP, key)), "n_runs": len(part), "n_diverged": int(part["diverged"].sum()),
            "mean_acc": mean, "ci95": half,
            "min_acc": float(ok.min()) if ok.size else math.nan, "max_acc": float(ok.max()) if ok.size else math.nan,
            "diverged_task_min": part["diverged_task"].min(),
            "grad_norm_p99_median": part["grad_norm_p99"].median(), "grad_norm_max": part["grad_norm_max"].max(),
            "kappa_max": part["kappa_max"].max(), "kappa_frac_ge2_max": part["kappa_frac_ge2"].max(),
            "penalty_share_p50_median": part["penalty_share_p50"].median(),
            "nonfinite_grad_steps": int(part["nonfinite_grad_steps"].sum()),
            "clipped_fraction": clipped / part["steps"].sum() if pd.notna(clipped) and part["steps"].sum() else math.nan,
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 3 as strings (Markdown and LaTeX): accuracy as mean ± 95% CI (n/a when every run diverged)."""
    def fmt(v: object, spec: str) -> str:
        return "n/a" if v is None or pd.isna(v) else format(v, spec)

    show = pd.DataFrame({
        "arch": summary["arch"], "method": summary["method"], "variant": summary["variant"],
        "optimizer": summary["optimizer"], "λ": [fmt(v, "g") for v in summary["lam"]],
        "runs": summary["n_runs"], "diverged": summary["n_diverged"],
        "acc after last task (95% CI)": [
            "n/a" if pd.isna(m) else f"{m:.4f}" + ("" if pd.isna(h) else f" ± {h:.4f}")
            for m, h in zip(summary["mean_acc"], summary["ci95"])
        ],
        "max ‖g‖": [fmt(v, ".3g") for v in summary["grad_norm_max"]],
        "max κ": [fmt(v, ".3g") for v in summary["kappa_max"]],
        "clipped steps": [fmt(100 * v, ".1f") + ("" if pd.isna(v) else "%") for v in summary["clipped_fraction"]],
    })
    return show


def summary_markdown(summary: pd.DataFrame) -> str:
    return summary_display(summary).to_markdown(index=False) + "\n"


def summary_latex(summary: pd.DataFrame) -> str:
    """Table 3 in LaTeX (booktabs)."""
    from ewcstab import latex

    caption = ("Gradient explosion: plain (original), clipped and stabilized EWC per optimizer and lambda: runs, "
               "diverged runs, mean accuracy after the last task (± 95% half-width over the runs that did not "
               "diverge), the largest gradient norm and step gain κ seen, and the share of clipped steps.")
    notes = ("κ = 2 α c: the penalty's step gain on a weight (≥ 1: a step overshoots the anchor, ≥ 2: plain "
             "gradient descent diverges). A run is diverged when its loss or gradient becomes non-finite or "
             "its loss blows up.")
    return latex.to_latex(summary_display(summary), caption, "tab:explosion", notes)


#: The paper's claims about the stabilized penalty (Section 2), as ``claims`` checks them.
CLAIMS = {
    "a": "plain EWC diverges or degrades at large lambda",
    "b": "clipping prevents divergence but retains less than stabilized",
    "c": "stabilized is never worse than original at its best lambda by more than the 95% CI",
}
CLAIM_COLUMNS = [
    "arch", "method", "optimizer", "lam_max", "original_diverged", "clipped_diverged", "stabilized_diverged",
    "original_acc_at_lam_max", "stabilized_acc_at_lam_max", "best_original", "best_clipped", "best_stabilized",
    "claim_a", "claim_b", "claim_c",
]


def _best(part: pd.DataFrame) -> pd.Series | None:
    """The summary row with the highest mean accuracy (None when every lambda diverged)."""
    ok = part[part["mean_acc"].notna()]
    return None if ok.empty else ok.loc[ok["mean_acc"].idxmax()]


def _ci(value: float) -> float:
    return 0.0 if pd.isna(value) else float(value)


def claims(summary: pd.DataFrame) -> pd.DataFrame:
    """The paper's claims (``CLAIMS``) checked per (arch, method, optimizer) on the summary table.

    Each ``claim_*`` is True, False, or NaN where a variant it needs was not run or never trained
    without diverging. With the largest lambda swept, lam_max:
      (a) original at lam_max diverged in some run, or its mean accuracy is below stabilized's there
          by more than the two 95% half-widths together;
      (b) no clipped run diverged at any lambda, and clipped's best mean accuracy is below
          stabilized's best by more than the larger of their half-widths;
      (c) stabilized's best mean accuracy >= original's best minus the larger of their half-widths.
    ``*_diverged``: diverged runs / runs over every lambda; ``best_*``: the best mean accuracy.
    """
    rows = []
    for (arch, method, opt), part in summary.groupby(["arch", "method", "optimizer"], sort=True):
        by = {v: part[part["variant"] == v] for v in ("original", "clipped", "stabilized")}
        lam_max = float(part["lam"].max())
        at_max = {v: df[df["lam"] == lam_max] for v, df in by.items()}
        best = {v: _best(df) if len(df) else None for v, df in by.items()}
        row = {"arch": arch, "method": method, "optimizer": opt, "lam_max": lam_max}
        for v, df in by.items():
            row[f"{v}_diverged"] = f"{int(df['n_diverged'].sum())}/{int(df['n_runs'].sum())}" if len(df) else ""
            row[f"best_{v}"] = math.nan if best[v] is None else float(best[v]["mean_acc"])
        for v in ("original", "stabilized"):
            row[f"{v}_acc_at_lam_max"] = float(at_max[v]["mean_acc"].iloc[0]) if len(at_max[v]) else math.nan
        o, st, cl = at_max["original"], at_max["stabilized"], by["clipped"]
        if len(o) and len(st):
            o, st = o.iloc[0], st.iloc[0]
            margin = _ci(o["ci95"]) + _ci(st["ci95"])
            row["claim_a"] = bool(o["n_diverged"] > 0 or (pd.notna(st["mean_acc"]) and pd.notna(o["mean_acc"])
                                                           and o["mean_acc"] < st["mean_acc"] - margin))
        else:
            row["claim_a"] = math.nan
        if len(cl) and best["clipped"] is not None and best["stabilized"] is not None:
            tol = max(_ci(best["clipped"]["ci95"]), _ci(best["stabilized"]["ci95"]))
            row["claim_b"] = bool(cl["n_diverged"].sum() == 0
                                  and best["clipped"]["mean_acc"] < best["stabilized"]["mean_acc"] - tol)
        else:
            row["claim_b"] = math.nan
        if best["original"] is not None and best["stabilized"] is not None:
            tol = max(_ci(best["original"]["ci95"]), _ci(best["stabilized"]["ci95"]))
            row["claim_c"] = bool(best["stabilized"]["mean_acc"] >= best["original"]["mean_acc"] - tol)
        else:
            row["claim_c"] = math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


def trace_rows(rec: dict, source: str = "") -> list[dict]:
    """Per-step rows of a traced run record (``telemetry_trace``), steps numbered within the task and
    across tasks (``global_step``, 1-based); non-finite values (null in the record) are NaN."""
    if "telemetry_trace" not in rec:
        raise ValueError(f"{source or 'record'}: no telemetry_trace (run it with 'ewcstab run --trace')")
    cfg, div = rec["config"], rec.get("diverged_at") or {}
    clip = {int(t["task"]): t.get("clip_norm") for t in rec.get("telemetry") or []}
    rows, offset = [], 0
    for task in rec["telemetry_trace"]:
        t = int(task["task"])
        n = len(task["grad_norm"])
        for i in range(n):
            rows.append({
                "arch": cfg["arch"], "method": cfg["method"], "variant": cfg["variant"],
                "optimizer": cfg.get("optimizer", "adam"), "lam": float(cfg["lam"]), "seed": int(rec["seed"]),
                "task": t, "step": i + 1, "global_step": offset + i + 1,
                **{c: _num(task[c][i]) for c in ("loss", "task_grad_norm", "penalty_grad_norm", "grad_norm")},
                "clip_norm": _num(clip.get(t)), "diverged": bool(rec["diverged"]),
                "diverged_task": div.get("task"), "diverged_step": div.get("step"), "source": source,
            })
        offset += n
    return rows


def gather_traces(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Traced run records -> one row per optimizer step (``TRACE_COLUMNS``)."""
    rows = [row for p in paths for row in trace_rows(read_json(p), str(p))]
    return pd.DataFrame(rows, columns=TRACE_COLUMNS)


__all__ = [
    "CLAIMS", "CLAIM_COLUMNS", "claims", "GROUP", "RUN_COLUMNS", "SUMMARY_COLUMNS", "TRACE_COLUMNS", "gather_runs", "gather_traces", "per_run",
    "run_rows", "summarize", "summary_display", "summary_latex", "summary_markdown",
    "trace_rows",
]
