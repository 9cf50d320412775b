"""Run records -> tidy tables (pandas), with the paper's numbers beside ours.

``ewcstab gather``: JSON run records -> one long-format CSV, one row per run and task
(the mean accuracy after that task), with the run's role (final, baseline, sweep) and optimizer
state (fresh, carried). ``ewcstab table``: that CSV plus the studies' lambda records -> Table 1
(CSV, Markdown and LaTeX). The CSV has one row per (arch, method, variant, optimizer state): the
lambda, mean accuracy after the last task with its 95% half-width (t(0.975, n-1) * std / sqrt(n),
ddof = 0, as the paper), runs, diverged runs, the lambda = 0 baseline in the same state, the
per-task curve, the paper's numbers from its reference CSV and the gap to them in units of the
paper's 95% half-width, (ours - paper) / paper's half-width; a note says where the paper has no
number. The Markdown and LaTeX tables show one column per optimizer state beside the paper's.

Every record is checked before it is counted (``load_record``, ``load_records``): complete JSON, the run-record
schema and keys, a config that agrees with the record's path (``results/runs/{arch}/{method}/{variant}/
{state}/seed{seed}.json``, ``.../{arch}/baseline/{state}/seed{seed}.json``: a record copied over another's path is caught), and
each run gathered once. A bad record stops the gathering with a ``DataError`` naming its file, so no table is
built from it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from ewcstab.config import ARCHS, METHODS, OPTIMIZER_STATES, OPTIMIZERS, VARIANTS
from ewcstab.errors import DataError
from ewcstab.metrics import mean_ci95

KEYS = ["arch", "method", "variant"]
#: Optimizer states in the order Table 1 shows them; records without the field are fresh.
STATES = ("carried", "fresh")

#: Every run record has these keys (``ewcstab.records.run_record``), and its config these.
RECORD_SCHEMA = "ewcstab.run/"
RECORD_KEYS = ("schema", "config", "seed", "tasks", "acc_matrix", "mean_acc_after_task", "final_mean_acc",
               "diverged", "train_seconds", "provenance")
RECORD_CONFIG_KEYS = ("arch", "sequence", "method", "variant", "lam", "seed")

#: Path segments that name an axis of the run: folder name -> (config key, value).
_AXIS_FOLDERS = {
    **{a: ("arch", a) for a in ARCHS}, **{m: ("method", m) for m in METHODS},
    **{v: ("variant", v) for v in VARIANTS}, **{o: ("optimizer", o) for o in OPTIMIZERS},
    **{s: ("optimizer_state", s) for s in OPTIMIZER_STATES}, "baseline": ("lam", 0.0),
}
_SEED = re.compile(r"(?:trial\d+_)?seed(\d+)")
_LAM = re.compile(r"lam([0-9][0-9.e+-]*)")


def path_axes(path: str | Path) -> dict[str, Any]:
    """The run axes a record's path names, read from its end (``seed1``, ``original``, ``mas``, ``mlp``...) up
    to the first folder that names none (``runs``), so folders above the results never count."""
    parts = [*Path(path).parent.parts, Path(path).stem]
    axes: dict[str, Any] = {}
    for part in reversed(parts):
        if (m := _SEED.fullmatch(part)) and "seed" not in axes:
            axes["seed"] = int(m.group(1))
        elif (m := _LAM.fullmatch(part)) and "lam" not in axes:
            try:
                axes["lam"] = float(m.group(1))
            except ValueError:
                break
        elif part in _AXIS_FOLDERS and _AXIS_FOLDERS[part][0] not in axes:
            key, value = _AXIS_FOLDERS[part]
            axes[key] = value
        else:
            break
    return axes


def load_record(path: str | Path) -> dict[str, Any]:
    """A run record, checked: complete JSON, the run-record schema and keys, and a config that agrees with every
    axis its path names (``path_axes``). A ``DataError`` naming the file otherwise."""
    try:
        with open(path) as fh:
            rec = json.load(fh)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise DataError(f"{path}: not a complete JSON run record ({getattr(err, 'msg', err)}{where}); a cut-off "
                        "write? Delete it and rerun the job that makes it") from None
    if not isinstance(rec, dict) or not str(rec.get("schema", "")).startswith(RECORD_SCHEMA):
        found = rec.get("schema") if isinstance(rec, dict) else type(rec).__name__
        raise DataError(f"{path}: not a run record (schema {found!r}, expected {RECORD_SCHEMA}N)")
    missing = [k for k in RECORD_KEYS if k not in rec]
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    missing += [f"config.{k}" for k in RECORD_CONFIG_KEYS if k not in cfg]
    if missing:
        raise DataError(f"{path}: run record without {', '.join(missing)}")
    if cfg["seed"] != rec["seed"]:
        raise DataError(f"{path}: seed {rec['seed']} but its config says seed {cfg['seed']}")
    own = {**cfg, "optimizer_state": cfg.get("optimizer_state", "fresh")}
    for key, value in path_axes(path).items():
        if own.get(key) != value:
            raise DataError(f"{path}: the record's {key} is {own.get(key)!r} but its path says {value!r} "
                            "(a record copied over another's?)")
    return rec


def record_identity(rec: dict[str, Any], role: str) -> tuple:
    """What makes a run one run: (arch, method, variant, lambda mode, optimizer_state, seed); the lambda mode is
    the role (``final``: the study's lambda, ``baseline``: lambda = 0), for a sweep its lambda."""
    cfg = rec["config"]
    mode = f"sweep lam {cfg['lam']}" if role == "sweep" else role
    return cfg["arch"], cfg["method"], cfg["variant"], mode, cfg.get("optimizer_state", "fresh"), rec["seed"]


def load_records(paths: list[str], role: str) -> list[dict[str, Any]]:
    """``load_record`` for every path, and each run once (``record_identity``); a ``DataError`` naming the file."""
    seen: dict[tuple, str] = {}
    records = []
    for path in paths:
        rec = load_record(path)
        key = record_identity(rec, role)
        if key in seen:
            axes = ", ".join(f"{k} {v}" for k, v in zip(
                ("arch", "method", "variant", "role", "optimizer_state", "seed"), key))
            raise DataError(f"{path}: the same run as {seen[key]} ({axes}); each run is counted once")
        seen[key] = str(path)
        records.append(rec)
    return records


def gather_records(paths: list[str], role: str) -> pd.DataFrame:
    """One row per (run, after_task), every record checked first (``load_records``); diverged runs keep rows
    with NaN accuracy after the divergence."""
    rows = []
    for path, rec in zip(paths, load_records(paths, role)):
        cfg = rec["config"]
        for t, mean in enumerate(rec["mean_acc_after_task"], start=1):
            rows.append({
                "arch": cfg["arch"], "sequence": cfg["sequence"], "method": cfg["method"],
                "variant": cfg["variant"], "lam": cfg["lam"], "seed": rec["seed"], "role": role,
                "optimizer_state": cfg.get("optimizer_state", "fresh"),
                "chain_position": (rec.get("chain") or {}).get("position"), "after_task": t,
                "n_tasks": len(rec["tasks"]), "mean_acc": mean, "diverged": rec["diverged"],
                "train_seconds": sum(rec["train_seconds"]), "source": str(path),
            })
    return pd.DataFrame(rows)


def state_comparison(runs: pd.DataFrame) -> pd.DataFrame:
    """Carried against fresh optimizer state, per study (and lambda = 0): one row per (arch, method, variant,
    lambda) trained in both states, final and baseline runs of the runs table (``gather_records``).

    Columns: ``n_{state}``, ``acc_{state}`` and ``ci95_{state}`` (mean accuracy after the last task, the
    paper's 95% half-width), ``diff`` = carried - fresh, Welch's ``t`` and its two-sided ``p`` (unequal
    variances), ``task1_{state}`` (mean accuracy after task 1: the plain training every method shares), and
    for carried runs the mean by where the inherited state came from: ``carried_from_donor`` (chain position
    1, a fresh donor run) and ``carried_from_counted`` (positions >= 2, a counted run). Diverged runs are
    left out."""
    from scipy import stats

    if "optimizer_state" not in runs or set(runs["optimizer_state"]) < set(STATES):
        return pd.DataFrame()
    runs = runs[runs["role"].isin(["final", "baseline"]) & ~runs["diverged"].astype(bool)]
    rows = []
    for (arch, role, method, variant, lam), part in runs.groupby(["arch", "role", "method", "variant", "lam"],
                                                                  sort=False):
        last = part[part["after_task"] == part["n_tasks"]]
        first = part[part["after_task"] == 1]
        states = {s: last[last["optimizer_state"] == s]["mean_acc"].dropna().to_numpy() for s in STATES}
        if any(len(v) == 0 for v in states.values()):
            continue
        row = {"arch": arch, "method": "lambda = 0" if role == "baseline" else method,
               "variant": "" if role == "baseline" else variant, "lam": lam}
        for state, values in states.items():
            mean, ci = mean_ci95(values)
            row.update({f"n_{state}": len(values), f"acc_{state}": mean, f"ci95_{state}": ci,
                        f"task1_{state}": first[first["optimizer_state"] == state]["mean_acc"].mean()})
        row["diff"] = row["acc_carried"] - row["acc_fresh"]
        test = stats.ttest_ind(states["carried"], states["fresh"], equal_var=False)
        row["t"], row["p"] = float(test.statistic), float(test.pvalue)
        carried = last[last["optimizer_state"] == "carried"]
        if "chain_position" in carried:
            row["carried_from_donor"] = carried.loc[carried["chain_position"] == 1, "mean_acc"].mean()
            row["carried_from_counted"] = carried.loc[carried["chain_position"] >= 2, "mean_acc"].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def state_comparison_markdown(table: pd.DataFrame) -> str:
    """The comparison as a Markdown table (4 decimals; p in scientific notation)."""
    fmt = lambda v, d=4: "n/a" if pd.isna(v) else f"{v:.{d}f}"  # noqa: E731
    show = pd.DataFrame({
        "method": table["method"], "variant": table["variant"], "lambda": [f"{v:g}" for v in table["lam"]],
        "carried (95% CI)": [f"{fmt(m)} ± {fmt(c)} ({n})" for m, c, n in
                             zip(table["acc_carried"], table["ci95_carried"], table["n_carried"])],
        "fresh (95% CI)": [f"{fmt(m)} ± {fmt(c)} ({n})" for m, c, n in
                           zip(table["acc_fresh"], table["ci95_fresh"], table["n_fresh"])],
        "carried - fresh": [f"{v:+.4f}" for v in table["diff"]],
        "Welch t, p": [f"{t:.1f}, {p:.1e}" for t, p in zip(table["t"], table["p"])],
        "after task 1: carried / fresh": [f"{fmt(a)} / {fmt(b)}" for a, b in
                                          zip(table["task1_carried"], table["task1_fresh"])],
        "carried from donor / from counted run": [f"{fmt(a)} / {fmt(b)}" for a, b in
                                                  zip(table.get("carried_from_donor", pd.Series(dtype=float)),
                                                      table.get("carried_from_counted", pd.Series(dtype=float)))],
    })
    return show.to_markdown(index=False, disable_numparse=True) + "\n"


def _curve(df: pd.DataFrame) -> str:
    means = df.groupby("after_task")["mean_acc"].mean().sort_index()
    return ";".join(f"{v:.4f}" for v in means)


def continual_table(runs: pd.DataFrame, best: list[dict], paper: pd.DataFrame | None) -> pd.DataFrame:
    """Table 1: one row per studied (arch, method, variant) and optimizer state present in ``runs``."""
    if "optimizer_state" not in runs:
        runs = runs.assign(optimizer_state="fresh")
    final = runs[runs["role"] == "final"]
    baseline = runs[runs["role"] == "baseline"]
    present = [s for s in STATES if s in set(runs["optimizer_state"])]
    rows = []
    for b in best:
        key = (b["arch"], b["method"], b["variant"])
        for state in present:
            sel = final[(final["arch"] == key[0]) & (final["method"] == key[1]) & (final["variant"] == key[2])
                        & (final["optimizer_state"] == state)]
            if sel.empty:
                continue
            per_run = sel[sel["after_task"] == sel["n_tasks"]]
            ok = per_run[~per_run["diverged"]]
            mean, ci = mean_ci95(ok["mean_acc"].to_numpy())
            base = baseline[(baseline["arch"] == key[0]) & (baseline["after_task"] == baseline["n_tasks"])
                            & (baseline["optimizer_state"] == state)]
            base_mean, base_ci = mean_ci95(base["mean_acc"].dropna().to_numpy())
            rows.append({
                "arch": key[0], "method": key[1], "variant": key[2], "optimizer_state": state,
                "best_lambda": b["best_lambda"], "n_runs": len(per_run), "n_diverged": int(per_run["diverged"].sum()),
                "mean_acc_last": mean, "ci95_last": ci, "acc_lambda0": base_mean, "ci95_lambda0": base_ci,
                "n_runs_lambda0": len(base),
                "mean_acc_after_each_task": _curve(sel[~sel["source"].isin(per_run[per_run["diverged"]]["source"])]),
                "search_mode": b.get("mode"), "search_trials": sum(b.get("n_trials", {}).values()),
            })
    table = add_paper_columns(pd.DataFrame(rows), paper)
    if not table.empty:
        table["gap_in_paper_ci"] = (table["mean_acc_last"] - table["paper_mean_acc_last"]) / table["paper_ci95_last"]
    return table


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
    """Table 1 as strings, one row per study: ours in each optimizer state beside the paper's, with the
    gap in units of the paper's 95% half-width (the Markdown and LaTeX tables)."""
    fmt = lambda v, d=4: "n/a" if pd.isna(v) else f"{v:.{d}f}"  # noqa: E731
    rows = []
    for key, part in table.groupby(KEYS, sort=False):
        first = part.iloc[0]
        row = {"arch": key[0], "method": key[1], "variant": key[2],
               "ours: lambda": f"{first['best_lambda']:.4g}",
               "paper: lambda": "n/a" if pd.isna(first["paper_best_lambda"]) else f"{first['paper_best_lambda']:g}"}
        for _, r in part.iterrows():
            state = r["optimizer_state"]
            runs = f", {int(r['n_runs'])} runs" + (f", {int(r['n_diverged'])} diverged" if r["n_diverged"] else "")
            row[f"ours, {state}: acc (95% CI)"] = f"{fmt(r['mean_acc_last'])} ± {fmt(r['ci95_last'])}{runs}"
            row[f"{state}: gap (paper CIs)"] = "n/a" if pd.isna(r["gap_in_paper_ci"]) else f"{r['gap_in_paper_ci']:+.1f}"
        row["paper: acc (95% CI)"] = ("n/a" if pd.isna(first["paper_mean_acc_last"])
                                      else f"{fmt(first['paper_mean_acc_last'])} ± {fmt(first['paper_ci95_last'])}")
        for _, r in part.iterrows():
            row[f"ours, {r['optimizer_state']}: lambda=0"] = fmt(r["acc_lambda0"])
        row["paper: lambda=0"] = fmt(first["paper_acc_lambda0"])
        row["note"] = first["paper_note"]
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    return display_table(table).to_markdown(index=False) + "\n"


TABLE1_CAPTION = (
    "Lambda and mean accuracy over all tasks after the last task (± 95% half-width over the final runs) "
    "per architecture, importance method, EWC variant and optimizer state, beside the paper's numbers."
)


def to_latex(table: pd.DataFrame) -> str:
    from ewcstab import latex

    notes = ("95% half-width: t(0.975, n-1) · std / sqrt(n), ddof 0. Diverged runs are counted and left out "
             "of the accuracy. lambda=0: the same runs without the EWC penalty. carried: each run starts from "
             "the Adam state of the run before it, as the authors' scripts ran; fresh: a new optimizer per run. "
             "gap: (ours - paper) / the paper's 95% half-width.")
    return latex.to_latex(display_table(table), TABLE1_CAPTION, "tab:continual", notes)
