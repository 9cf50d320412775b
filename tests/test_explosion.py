"""The gradient-explosion study: tidy tables from run records (a diverged run has NaN accuracy, is counted
as diverged and left out of the mean), the figures on synthetic tables, the CLI, and the workflow's
outputs on the tiny configuration (config/quick.yaml's `explosion` section)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from conftest import REPO  # noqa: E402
from test_latex import check_latex_table  # noqa: E402
from ewcstab import cli  # noqa: E402
from ewcstab.explosion import (  # noqa: E402
    RUN_COLUMNS, SUMMARY_COLUMNS, TRACE_COLUMNS, claims, gather_runs, gather_traces, per_run, summarize,
    summary_markdown,
)
from ewcstab.figures.explosion import plot_explosion_accuracy, plot_explosion_traces  # noqa: E402
from ewcstab.metrics import mean_ci95  # noqa: E402

N_TASKS = 3


def telemetry(task: int, steps: int = 10, clip: float | None = None, diverged_step: int | None = None) -> dict:
    """One task's telemetry summary as ewcstab.telemetry writes it (None where undefined)."""
    return {
        "task": task, "steps": steps, "loss_first": 2.3, "loss_last": 0.5, "loss_max": 2.3,
        "grad_norm_mean": 1.0 * task, "grad_norm_p50": 1.0 * task, "grad_norm_p90": 2.0 * task,
        "grad_norm_p99": 3.0 * task, "grad_norm_max": 4.0 * task if diverged_step is None else None,
        "task_grad_norm_p50": 1.0, "task_grad_norm_max": 2.0, "penalty_grad_norm_p50": 0.5 * (task - 1),
        "penalty_grad_norm_max": 1.0 * (task - 1), "penalty_share_p50": 0.1 * (task - 1),
        "penalty_share_p90": 0.2, "penalty_share_p99": 0.3, "penalty_share_max": 0.4,
        "nonfinite_grad_steps": 0 if diverged_step is None else 1, "kappa_max": 0.5 * (task - 1),
        "kappa_frac_ge1": 0.0, "kappa_frac_ge2": 0.0, "anchor_dist_mean": None if task == 1 else 0.01,
        "anchor_dist_max": None if task == 1 else 0.1, "clip_norm": clip,
        "clipped_steps": None if clip is None else 4, "clipped_fraction": None if clip is None else 4 / steps,
        "diverged": diverged_step is not None, "diverged_step": diverged_step,
        "divergence_reason": None if diverged_step is None else "non-finite gradient",
    }


def record(variant: str = "original", lam: float = 100.0, seed: int = 0, acc: float = 0.8,
           diverge_task: int | None = None, optimizer: str = "sgd", arch: str = "mlp", trace: bool = False) -> dict:
    """A run record (the keys ewcstab.records.run_record writes that the study reads)."""
    clip = 1.0 if variant == "clipped" else None
    trained = N_TASKS if diverge_task is None else diverge_task
    tel = [telemetry(t, clip=clip, diverged_step=7 if t == diverge_task else None) for t in range(1, trained + 1)]
    means = [acc + 0.05 * (N_TASKS - t) for t in range(1, N_TASKS + 1)]
    if diverge_task is not None:
        means = means[: diverge_task - 1] + [None] * (N_TASKS - diverge_task + 1)
    rec = {
        "config": {"arch": arch, "sequence": "permuted_mnist", "method": "fisher", "variant": variant, "lam": lam,
                   "optimizer": optimizer, "lr": 0.01, "alpha": 0.01, "clip_norm": 1.0},
        "seed": seed, "tasks": [f"t{t}" for t in range(1, N_TASKS + 1)],
        "mean_acc_after_task": means, "final_mean_acc": means[-1], "diverged": diverge_task is not None,
        "diverged_at": None if diverge_task is None else
        {"task": diverge_task, "epoch": 1, "step": 7, "reason": "non-finite gradient"},
        "wall_seconds": 1.0, "telemetry": tel,
    }
    if trace:
        rec["telemetry_trace"] = [
            {"task": t, "loss": [1.0] * 10, "task_grad_norm": [1.0] * 10, "penalty_grad_norm": [0.0] * 10,
             "grad_norm": [1.0 + i for i in range(10)] if t != diverge_task else [1.0] * 7 + [None] * 3}
            for t in range(1, trained + 1)
        ]
    return rec


@pytest.fixture
def records(tmp_path) -> list:
    """Three seeds x (original, stabilized, clipped) at two lambdas; one original run at lambda 1e5 diverges."""
    paths = []
    for variant in ("original", "stabilized", "clipped"):
        for lam in (10.0, 1e5):
            for seed in range(3):
                div = 2 if (variant, lam, seed) == ("original", 1e5, 1) else None
                p = tmp_path / f"{variant}_{lam:g}_{seed}.json"
                p.write_text(json.dumps(record(variant, lam, seed, acc=0.7 + 0.01 * seed, diverge_task=div)))
                paths.append(p)
    return paths


def test_gather_one_row_per_run_and_task_diverged_run_has_nan_accuracy(records):
    runs = gather_runs(records)
    assert list(runs.columns) == RUN_COLUMNS
    assert len(runs) == len(records) * N_TASKS
    div = runs[runs["diverged"]]
    assert div["source"].nunique() == 1 and len(div) == N_TASKS
    assert div["final_mean_acc"].isna().all()  # never a fake number
    assert (div["diverged_task"] == 2).all() and (div["diverged_step"] == 7).all()
    assert div["trained"].tolist() == [True, True, False]  # task 3 never ran
    assert math.isnan(div.loc[div["task"] == 3, "grad_norm_p50"].iloc[0])
    assert div.loc[div["task"] == 2, "task_diverged"].iloc[0]
    ok = runs[~runs["diverged"]]
    assert ok["final_mean_acc"].notna().all() and ok["trained"].all()
    assert ok.loc[ok["variant"] == "clipped", "clip_norm"].eq(1.0).all()
    assert ok.loc[ok["variant"] != "clipped", "clip_norm"].isna().all()


def test_summary_counts_diverged_and_leaves_them_out_of_the_mean(records):
    runs = gather_runs(records)
    summary = summarize(runs)
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert len(summary) == 3 * 2 and (summary["n_runs"] == 3).all()
    row = summary[(summary["variant"] == "original") & (summary["lam"] == 1e5)].iloc[0]
    assert row["n_diverged"] == 1 and row["diverged_task_min"] == 2
    mean, half = mean_ci95([0.7, 0.72])  # seeds 0 and 2; seed 1 diverged
    assert row["mean_acc"] == pytest.approx(mean) and row["ci95"] == pytest.approx(half)
    assert row["nonfinite_grad_steps"] == 1
    assert summary.loc[summary["n_diverged"] == 0, "mean_acc"].notna().all()
    assert summary["n_diverged"].sum() == 1
    clipped = summary[summary["variant"] == "clipped"]
    assert clipped["clipped_fraction"].eq(0.4).all()  # 4 of 10 steps per task
    assert summary.loc[summary["variant"] != "clipped", "clipped_fraction"].isna().all()
    assert row["grad_norm_max"] == 12.0  # task 3 of the runs that did not diverge
    one = per_run(runs)
    assert one.loc[one["diverged"], "grad_norm_max"].tolist() == [4.0]  # the diverged task's is undefined
    md = summary_markdown(summary)
    assert md.count("\n| mlp") == 6 and "±" in md and "40.0%" in md


def test_summary_when_every_run_diverged_has_no_accuracy(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(record(diverge_task=1)))
    summary = summarize(gather_runs([p]))
    assert summary["n_diverged"].iloc[0] == 1 and summary["mean_acc"].isna().all()
    assert "n/a" in summary_markdown(summary)


def test_cli_gather_summary_traces(records, tmp_path):
    runs_csv, csv, md, tex, tr = (tmp_path / n for n in ("runs.csv", "s.csv", "s.md", "s.tex", "traces.csv"))
    assert cli.main(["explosion-gather", "--records", *map(str, records), "--out", str(runs_csv)]) == 0
    assert cli.main(["explosion-summary", "--runs", str(runs_csv), "--csv-out", str(csv), "--md-out", str(md),
                     "--tex-out", str(tex)]) == 0
    table = pd.read_csv(csv)
    assert len(table) == 6 and table["n_diverged"].sum() == 1
    rows = check_latex_table(tex.read_text())
    assert len(rows) == 1 + 6 and [r[6] for r in rows[1:]].count("1") == 1  # the diverged column
    traced = tmp_path / "traced.json"
    traced.write_text(json.dumps(record(trace=True, diverge_task=2)))
    assert cli.main(["explosion-traces", "--records", str(traced), "--out", str(tr)]) == 0
    traces = pd.read_csv(tr)
    assert list(traces.columns) == TRACE_COLUMNS
    assert len(traces) == 20 and traces["global_step"].tolist() == list(range(1, 21))
    assert traces["grad_norm"].isna().sum() == 3  # null in the record: never a number
    with pytest.raises(ValueError, match="--trace"):
        gather_traces(records[:1])


def test_accuracy_figure_panels_lines_and_diverged_markers(records, tmp_path):
    runs = gather_runs(records)
    adam = runs.assign(optimizer="adam", source=runs["source"] + "#adam", diverged=False,
                       final_mean_acc=runs["final_mean_acc"].fillna(0.6))
    att = runs.assign(arch="attention", source=runs["source"] + "#att")  # sgd only
    fig = plot_explosion_accuracy(pd.concat([runs, adam, att], ignore_index=True))
    axes = fig.get_axes()
    assert len(axes) == 3  # (mlp, attention) x (adam, sgd), attention with adam left out: no runs
    titles = [ax.get_title() for ax in axes]
    assert titles[0].startswith("MLP") and "adam (lr 0.01)" in titles[0] and "sgd" in titles[1]
    assert titles[2].startswith("attention") and "sgd" in titles[2]
    for ax, opt in zip(axes, ["adam", "sgd", "sgd"]):
        crosses = [c for c in ax.collections if c.get_gid() == "diverged"]
        counts = [t.get_text() for t in ax.texts if t.get_gid() == "diverged-count"]
        if opt == "sgd":
            assert len(crosses) == 1 and counts == ["1/3"]
        else:
            assert not crosses and not counts
        assert ax.get_xscale() == "log" and ax.get_ylim() == (0, 1)
        assert len(ax.containers) == 3  # one error-bar line per variant
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:3] == ["original", "stabilized", "clipped"] and any("diverged" in t for t in legend)
    from ewcstab.figures import save_figure

    save_figure(fig, tmp_path / "a.png", tmp_path / "a.pdf")
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "a.pdf").exists()


def test_trace_figure_log_scale_boundaries_clip_line_and_divergence(tmp_path):
    paths = []
    for variant, div in (("original", 2), ("stabilized", None), ("clipped", None)):
        for opt in ("adam", "sgd"):
            p = tmp_path / f"{variant}_{opt}.json"
            p.write_text(json.dumps(record(variant, 1e5, optimizer=opt, trace=True, diverge_task=div)))
            paths.append(p)
    fig = plot_explosion_traces(gather_traces(paths))
    axes = fig.get_axes()
    assert len(axes) == 2  # mlp x (adam, sgd)
    for ax in axes:
        assert ax.get_yscale() == "log"
        vlines = [ln for ln in ax.lines if ln.get_linestyle() == ":"]
        assert [ln.get_xdata()[0] for ln in vlines] == [10.5, 20.5]  # 3 tasks of 10 steps
        assert len([ln for ln in ax.lines if ln.get_gid() == "clip_norm"]) == 1
        crosses = [ln for ln in ax.lines if ln.get_gid() == "diverged"]
        assert len(crosses) == 1 and crosses[0].get_xdata()[0] == 17  # task 2, step 7: its last finite step
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "task boundary" in legend and "clipping threshold" in legend


# ------------------------------------------------------------------------------------------- workflow
@pytest.mark.workflow
def test_workflow_writes_the_study_tables_and_figures(tiny_workflow):
    """config/quick.yaml's explosion section: mlp at 2 lambdas, attention at 1, 3 variants, sgd, 1 seed,
    2 tasks; attention traced."""
    quick = yaml.safe_load((REPO / "config/quick.yaml").read_text())["explosion"]
    n_runs = sum(len(quick["lambdas"][a]) for a in quick["archs"]) * len(quick["variants"]) * quick["seeds"]
    n_runs *= len(quick["methods"]) * len(quick["optimizers"])
    runs = pd.read_csv(tiny_workflow / "results/tables/explosion_runs.csv")
    assert list(runs.columns) == RUN_COLUMNS
    assert runs["source"].nunique() == n_runs and len(runs) == n_runs * 2
    assert set(runs["arch"]) == {"mlp", "attention"} and set(runs["variant"]) == {"original", "stabilized", "clipped"}
    assert runs.loc[runs["diverged"], "final_mean_acc"].isna().all()
    assert runs.loc[~runs["diverged"], "final_mean_acc"].between(0, 1).all()
    # the stabilized penalty's step gain stays below 1 at every lambda, so it never diverges
    stab = runs[runs["variant"] == "stabilized"]
    assert not stab["diverged"].any() and (stab["kappa_max"].dropna() < 1 + 1e-6).all()
    # plain SGD on the original penalty at lambda 1e5 has step gains in the hundreds: it diverges
    blown = runs[(runs["variant"] == "original") & (runs["lam"] == 1e5)]
    assert blown["diverged"].all() and (blown["kappa_max"].max() > 2)
    summary = pd.read_csv(tiny_workflow / "results/tables/explosion_summary.csv")
    assert len(summary) == n_runs // quick["seeds"] and (summary["n_runs"] == quick["seeds"]).all()
    assert (summary["n_diverged"] == summary["mean_acc"].isna()).all()  # 1 seed: diverged <=> no accuracy
    md = (tiny_workflow / "results/tables/explosion_summary.md").read_text()
    assert md.count("\n|") == len(summary) + 1  # the separator line and one per row
    tex = check_latex_table((tiny_workflow / "results/tables/explosion_summary.tex").read_text())
    assert len(tex) == 1 + len(summary)
    traces = pd.read_csv(tiny_workflow / "results/tables/explosion_traces.csv")
    assert set(traces["arch"]) == {"attention"} and traces.groupby("variant")["lam"].first().eq(1e5).all()
    assert set(traces["variant"]) == {"original", "stabilized", "clipped"}
    for name in ("accuracy_vs_lambda", "grad_norm_traces"):
        for ext in ("png", "pdf"):
            assert (tiny_workflow / f"results/figures/explosion/{name}.{ext}").stat().st_size > 1000
    page = (tiny_workflow / "results/report/explosion/explosion_summary.html").read_text()
    assert "<table>" in page
    assert (tiny_workflow / "logs/explosion/attention/traces/original/sgd.log").exists()
    assert (tiny_workflow / "benchmarks/explosion/mlp/fisher/original/sgd/lam100000/seed0.tsv").exists()
    rec = json.loads((tiny_workflow / "results/explosion/mlp/fisher/clipped/sgd/lam10/seed0.json").read_text())
    paper_scale = yaml.safe_load((REPO / "config/config.yaml").read_text())["explosion"]  # quick.yaml keeps these
    assert rec["config"]["lr"] == rec["config"]["alpha"] == paper_scale["lr"]["sgd"]["mlp"]
    assert rec["config"]["clip_norm"] == paper_scale["clip_norm"]["mlp"]


@pytest.mark.workflow
def test_default_config_lists_the_sweep_and_no_section_means_no_jobs(tmp_path):
    work = tmp_path / "wf"
    work.mkdir()
    for item in ("Snakefile", "workflow", "config", "profiles", "envs"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / item)
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "1"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr, re.M)}
    e = yaml.safe_load((REPO / "config/config.yaml").read_text())["explosion"]
    n = sum(len(e["lambdas"][a]) for a in e["archs"]) * len(e["methods"]) * len(e["variants"])
    assert counts["train_explosion"] == n * len(e["optimizers"]) * e["seeds"]
    assert counts["trace_explosion"] == len(e["archs"]) * len(e["variants"]) * len(e["optimizers"])
    assert counts["plot_explosion_accuracy"] == counts["plot_explosion_traces"] == 1
    (work / "bad.yaml").write_text("explosion:\n  optimizers: [rmsprop]\n")
    proc = subprocess.run([*cmd, "--configfile", "bad.yaml"], cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "'rmsprop' is not one of ['adam', 'sgd']" in proc.stdout + proc.stderr
    cfg = yaml.safe_load((work / "config/config.yaml").read_text())
    del cfg["explosion"]
    (work / "config/config.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "explosion" not in proc.stdout + proc.stderr


def test_lam_labels_in_paths_round_trip():
    """Paths hold lambda as plain digits (common.smk's lam_label), parsed back exactly by `ewcstab run --lam`."""
    text = (REPO / "workflow/rules/common.smk").read_text()
    ns: dict = {}
    exec(re.search(r"def lam_label\(lam\):.*?\n\n", text, re.S).group(0), ns)
    for lam in (1, 10.0, 8500, 1e5, 1e6, 0.5, 2.5e-3):
        label = ns["lam_label"](lam)
        assert float(label) == lam and not label.endswith(".0")
        assert re.fullmatch(r"[0-9][0-9.e+-]*", label)
    assert ns["lam_label"](1e6) == "1000000" and np.isfinite(float(ns["lam_label"](1e20)))


def _summary_row(variant, lam, mean, ci=0.01, n_div=0, n=3, optimizer="sgd"):
    return {"arch": "mlp", "method": "fisher", "variant": variant, "optimizer": optimizer, "lam": lam,
            "n_runs": n, "n_diverged": n_div, "mean_acc": mean, "ci95": ci}


def test_claims_follow_their_rules():
    summary = pd.DataFrame([
        _summary_row("original", 1, 0.80), _summary_row("original", 100, math.nan, n_div=3),
        _summary_row("stabilized", 1, 0.805), _summary_row("stabilized", 100, 0.60),
        _summary_row("clipped", 1, 0.70), _summary_row("clipped", 100, 0.50),
        # adam: nothing diverges, original at the largest lambda within the CI of stabilized
        _summary_row("original", 1, 0.80, optimizer="adam"), _summary_row("original", 100, 0.60, optimizer="adam"),
        _summary_row("stabilized", 1, 0.75, optimizer="adam"), _summary_row("stabilized", 100, 0.61, optimizer="adam"),
    ])
    out = claims(summary).set_index("optimizer")
    sgd, adam = out.loc["sgd"], out.loc["adam"]
    assert sgd["original_diverged"] == "3/6" and sgd["clipped_diverged"] == "0/6" and sgd["lam_max"] == 100
    assert sgd["claim_a"] and sgd["claim_b"] and sgd["claim_c"]  # diverged; 0.70 < 0.805 - 0.01; 0.805 >= 0.79
    assert math.isnan(sgd["original_acc_at_lam_max"]) and sgd["best_original"] == 0.80
    assert not adam["claim_a"]  # 0.60 vs 0.61 is inside 0.01 + 0.01
    assert math.isnan(adam["claim_b"]) and adam["clipped_diverged"] == ""  # clipped not run
    assert not adam["claim_c"]  # 0.75 < 0.80 - 0.01
    every_diverged = summary.assign(n_diverged=3, mean_acc=math.nan)
    assert claims(every_diverged)[["claim_b", "claim_c"]].isna().all().all()
