"""Figures and report pages on small synthetic tables: what is drawn (panels, lines, markers), that
the PNG/PDF are written and byte-stable, and that the statistics are ewcstab.metrics.mean_ci95."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from ewcstab import figures  # noqa: E402
from ewcstab.figures import report  # noqa: E402
from ewcstab.metrics import mean_ci95  # noqa: E402

METHODS = ["fisher", "mas", "si"]
VARIANTS = ["original", "stabilized"]


def synthetic_trials(seed: int = 0) -> pd.DataFrame:
    """Three studies' trials per variant: complete, one pruned, one diverged (NaN value) each."""
    rng = np.random.default_rng(seed)
    rows = []
    for method in METHODS:
        for variant in VARIANTS:
            for n in range(6):
                state, diverged, value = "COMPLETE", False, 0.8 + 0.1 * rng.random()
                if n == 4:
                    state = "PRUNED"
                if n == 5:
                    state, diverged, value = "PRUNED", True, np.nan
                rows.append({"arch": "mlp", "method": method, "variant": variant, "number": n, "value": value,
                             "lam": float(10 ** rng.uniform(-1, 2)), "state": state, "duration_seconds": 1.0,
                             "diverged": diverged})
    return pd.DataFrame(rows)


def synthetic_runs(n_tasks: int = 3, seeds: int = 3, seed: int = 0) -> pd.DataFrame:
    """continual_runs.csv for METHODS x VARIANTS at one lambda each, plus a baseline."""
    rng = np.random.default_rng(seed)
    rows = []
    groups = [(m, v, "final", 1.0 + i) for i, (m, v) in enumerate((m, v) for m in METHODS for v in VARIANTS)]
    groups.append(("fisher", "original", "baseline", 0.0))
    for method, variant, role, lam in groups:
        for s in range(seeds):
            src = f"results/runs/mlp/{method}/{variant}/{role}{s}.json"
            for t in range(1, n_tasks + 1):
                rows.append({"arch": "mlp", "sequence": "permuted_mnist", "method": method, "variant": variant,
                             "lam": lam, "seed": s, "role": role, "after_task": t, "n_tasks": n_tasks,
                             "mean_acc": 0.95 - 0.03 * t + 0.01 * rng.random(), "diverged": False,
                             "train_seconds": 1.0, "source": src})
    return pd.DataFrame(rows)


def synthetic_table1() -> pd.DataFrame:
    rows = [{"arch": "mlp", "method": m, "variant": v, "best_lambda": 1.0, "paper_best_lambda": 4.0 + i,
             "paper_mean_acc_last": 0.95, "paper_ci95_last": 0.002}
            for i, (m, v) in enumerate((m, v) for m in METHODS for v in VARIANTS)]
    rows[-1].update(paper_best_lambda=np.nan, paper_mean_acc_last=np.nan, paper_ci95_last=np.nan)  # not in the paper
    return pd.DataFrame(rows)


def synthetic_pruning(seeds: int = 3) -> pd.DataFrame:
    """Per-network pruning curves (the agreed pruning_curves.csv columns)."""
    rng = np.random.default_rng(0)
    rows = []
    for scope in ("global", "per_layer"):
        for imp_i, imp in enumerate(["magnitude", "fisher", "signal"]):
            for s in range(seeds):
                for sp in np.linspace(0, 1, 11):
                    acc = 0.98 / (1 + np.exp((sp - 0.8 + 0.1 * imp_i) * 20)) + 0.01 * rng.random()
                    rows.append({"arch": "mlp", "importance_data": "test", "seed": s, "importance": imp,
                                 "scope": scope, "sparsity": round(float(sp), 3), "accuracy": acc,
                                 "n_pruned": int(sp * 1000)})
    return pd.DataFrame(rows)


def paper_continual() -> pd.DataFrame:
    from conftest import REPO

    return pd.read_csv(REPO / "config/reference/paper_continual.csv")


def paper_pruning() -> pd.DataFrame:
    from conftest import REPO

    return pd.read_csv(REPO / "config/reference/paper_pruning.csv")


def panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def png_ok(fig, tmp_path, name: str) -> bytes:
    png, pdf = tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"
    figures.save_figure(fig, png, pdf)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert pdf.read_bytes()[:5] == b"%PDF-"
    return data


@pytest.fixture(autouse=True)
def _style():
    figures.set_style()


def test_lambda_search_draws_every_trial_final_paper_and_baseline(tmp_path):
    trials, runs = synthetic_trials(), synthetic_runs()
    fig = figures.plot_lambda_search(trials, runs=runs, table1=synthetic_table1())
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == ["Fisher (EWC)", "MAS", "SI"]
    for ax in axes:
        assert ax.get_xscale() == "log"
        # per variant: one connecting line through the complete trials; one baseline line per panel
        assert len([ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]) >= 2
        assert any(ln.get_linestyle() == ":" for ln in ax.get_lines())
        # scatter: complete + pruned + diverged per variant = 6 collections at least
        offsets = np.concatenate([c.get_offsets() for c in ax.collections if len(c.get_offsets())])
        assert len(offsets) >= 12  # every trial of both variants is drawn
    # final runs and paper stars are error bars: 2 finals per panel, paper 2/2/1 (si stabilized not in paper)
    n_err = [len(ax.containers) for ax in axes]
    assert n_err == [4, 4, 3]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "original" in legend and "trial diverged (drawn at the bottom)" in legend
    png_ok(fig, tmp_path, "lambda_search")


def test_lambda_search_leaves_out_methods_without_trials_and_needs_arch_when_ambiguous():
    trials = synthetic_trials()
    fig = figures.plot_lambda_search(trials[trials["method"] != "mas"])
    assert len(panels(fig)) == 2
    two = pd.concat([trials, trials.assign(arch="cnn")])
    with pytest.raises(ValueError, match="choose one with arch="):
        figures.plot_lambda_search(two)
    assert len(panels(figures.plot_lambda_search(two, arch="cnn"))) == 3
    # four methods wrap as 2 x 2, with no empty panel
    four = pd.concat([trials, trials[trials["method"] == "si"].assign(method="signal")])
    assert len(panels(figures.plot_lambda_search(four))) == 4


def test_task_curves_bands_are_mean_ci95_and_paper_is_dashed(tmp_path):
    runs = synthetic_runs()
    fig = figures.plot_task_curves(runs, paper=paper_continual())
    axes = panels(fig)
    assert len(axes) == 3
    fisher = axes[0]
    solid = [ln for ln in fisher.get_lines() if ln.get_linestyle() == "-"]
    dashed = [ln for ln in fisher.get_lines() if ln.get_linestyle() == "--"]
    assert len(solid) == 3  # baseline, original, stabilized
    assert len(dashed) == 2  # the paper's original and stabilized curves (10 tasks)
    assert len(dashed[0].get_xdata()) == 10
    sel = runs[(runs.role == "final") & (runs.method == "fisher") & (runs.variant == "original") & (runs.after_task == 2)]
    mean, half = mean_ci95(sel["mean_acc"].to_numpy())
    orig = solid[1]
    assert orig.get_ydata()[1] == pytest.approx(mean)
    band = fisher.collections[1].get_paths()[0].vertices[:, 1]  # fill_between polygon of the original
    assert band.max() == pytest.approx(max(runs_mean_plus_half(runs, "fisher", "original")), rel=1e-9)
    assert half > 0
    png_ok(fig, tmp_path, "task_curves")


def runs_mean_plus_half(runs, method, variant):
    out = []
    sel = runs[(runs.role == "final") & (runs.method == method) & (runs.variant == variant)]
    for _, part in sel.groupby("after_task"):
        m, h = mean_ci95(part["mean_acc"].to_numpy())
        out.append(m + h)
    return out


def test_task_curves_leave_out_diverged_runs():
    runs = synthetic_runs()
    bad = (runs.method == "si") & (runs.variant == "original") & (runs.seed == 0) & (runs.role == "final")
    runs.loc[bad, "diverged"] = True
    runs.loc[bad & (runs.after_task == 3), "mean_acc"] = np.nan
    curves = figures.task_curves(runs)
    si = curves[(curves.method == "si") & (curves.variant == "original")]
    assert (si["n_runs"] == 2).all() and (si["n_diverged"] == 1).all()
    fig = figures.plot_task_curves(runs)
    assert any("diverged runs left out" in t.get_text() for t in panels(fig)[2].texts)


def test_search_trials_one_panel_per_study_with_colourbar(tmp_path):
    trials = synthetic_trials()
    trials = trials[~((trials.method == "si") & (trials.variant == "stabilized"))]  # a missing study
    fig = figures.plot_search_trials(trials)
    axes = panels(fig)
    assert len(axes) == 5  # 3 methods x 2 variants - the missing one
    assert len(fig.axes) == 6  # + colour bar
    titles = {ax.get_title() for ax in axes}
    assert "SI, stabilized" not in titles and "SI, original" in titles
    for ax in axes:
        # complete, pruned, diverged, best ring
        assert len(ax.collections) == 4
    png_ok(fig, tmp_path, "search_trials")


def test_state_comparison_has_a_row_per_setting_both_states_and_the_paper(tmp_path):
    """One row per EWC setting (lambda = 0 left out), a filled carried and an open fresh point with their CIs,
    and the paper's star where the paper has the setting."""
    rows = [{"arch": "mlp", "method": m, "variant": v, "lam": 1.0 + i, "acc_carried": 0.95, "ci95_carried": 0.002,
             "acc_fresh": 0.945, "ci95_fresh": 0.003} for i, (m, v) in enumerate((m, v) for m in METHODS for v in VARIANTS)]
    rows.append({"arch": "mlp", "method": "lambda = 0", "variant": np.nan, "lam": 0.0, "acc_carried": 0.47,
                 "ci95_carried": 0.01, "acc_fresh": 0.47, "ci95_fresh": 0.01})
    paper = synthetic_table1().rename(columns={"paper_mean_acc_last": "mean_acc_last", "paper_ci95_last": "ci95_last"})
    fig = figures.plot_state_comparison(pd.DataFrame(rows), paper, "mlp")
    (ax,) = panels(fig)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == len(METHODS) * len(VARIANTS) and not any("lambda = 0" in t for t in labels)
    assert labels[0].startswith("Fisher (EWC), original")
    stars = [line for line in ax.lines if line.get_marker() == "*"]
    assert len(stars) == len(labels) - 1  # the last setting is not in the paper
    xs = sorted({float(line.get_xdata()[0]) for line in ax.lines if line.get_marker() in ("o", "^")})
    assert xs == pytest.approx([0.945, 0.95])
    png_ok(fig, tmp_path, "optimizer_states")


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_pruning_curves_per_scope_with_paper(tmp_path, scope):
    curves = synthetic_pruning()
    fig = figures.plot_pruning_curves(curves, scope, paper=paper_pruning())
    (ax,) = panels(fig)
    assert len(ax.get_lines()) >= 3  # one mean line per importance (+ error bar stems of the paper)
    assert len(ax.containers) == 3  # the paper's points for magnitude, fisher, signal
    summary = figures.pruning_summary(curves)
    assert set(summary.columns) >= {"mean_acc", "ci95", "n_runs"} and (summary["n_runs"] == 3).all()
    png_ok(fig, tmp_path, f"pruning_{scope}")


def test_pruning_curves_accept_averaged_tables_and_split_panels():
    curves = synthetic_pruning()
    two = pd.concat([curves, curves.assign(importance_data="heldout")])
    fig = figures.plot_pruning_curves(figures.pruning_summary(two), "global")
    assert len(panels(fig)) == 2
    with pytest.raises(ValueError, match="no pruning curves for scope"):
        figures.plot_pruning_curves(curves, "nope")


def test_figures_are_deterministic(tmp_path):
    a = png_ok(figures.plot_lambda_search(synthetic_trials(), synthetic_runs(), synthetic_table1()), tmp_path, "a")
    b = png_ok(figures.plot_lambda_search(synthetic_trials(), synthetic_runs(), synthetic_table1()), tmp_path, "b")
    assert a == b
    assert (tmp_path / "a.pdf").read_bytes() == (tmp_path / "b.pdf").read_bytes()


def test_read_trials_takes_the_study_from_the_folder(tmp_path):
    path = tmp_path / "search/mlp/mas/stabilized/trials.csv"
    path.parent.mkdir(parents=True)
    path.write_text("number,value,lam,state,duration_seconds\n0,0.7,1.5,COMPLETE,2.0\n1,,3.0,PRUNED,1.0\n")
    trials = figures.read_trials(figures.find_trials(tmp_path))
    assert trials[["arch", "method", "variant"]].drop_duplicates().values.tolist() == [["mlp", "mas", "stabilized"]]
    assert not trials["diverged"].any() and trials["value"].isna().tolist() == [False, True]


def test_provenance_table_flags_disagreeing_records(tmp_path):
    prov = {"packages": {"torch": "2.14.1"}, "git": {"commit": "abc", "dirty": False}, "device": "cpu",
            "host": "h", "data_root": "/d", "data_sha256": {"MNIST/raw/x": "11"}, "created": "2026-01-01T00:00:00"}
    paths = []
    for i, commit in enumerate(["abc", "abc", "def"]):
        p = tmp_path / f"r{i}.json"
        p.write_text(json.dumps({"provenance": {**prov, "git": {"commit": commit, "dirty": False}}}))
        paths.append(p)
    table = report.provenance_table(report.read_provenance(paths))
    commits = table[table.field == "git commit"]
    assert commits[["value", "n_records"]].values.tolist() == [["abc", 2], ["def", 1]]
    assert not commits["consistent"].any() and table[table.field == "package torch"]["consistent"].all()
    summary = report.provenance_summary(report.read_provenance(paths))
    assert summary["n_records"] == 3 and summary["inconsistent_fields"] == ["git commit"]
    html = report.render_table_frame(table, "provenance")
    assert html.count("class='warn'") == 2 and "data sha256 MNIST/raw/x" in html


def test_table1_page_shows_ours_beside_the_paper(tmp_path):
    t1 = synthetic_table1().assign(
        n_runs=2, n_diverged=0, mean_acc_last=0.7, ci95_last=0.01, acc_lambda0=0.6, ci95_lambda0=0.02,
        mean_acc_after_each_task="0.8;0.7", search_mode="tpe", search_trials=3, paper_acc_lambda0=np.nan,
        paper_note="")
    csv = tmp_path / "table1_continual.csv"
    t1.to_csv(csv, index=False)
    page = report.render_table(csv, "table1_continual")
    assert "0.7000 ± 0.0100" in page and "0.9500 ± 0.0020" in page and "<script" not in page
    cfg = report.config_page({"continual": {"archs": ["mlp"]}}, ["config/config.yaml"])
    assert "archs:" in cfg and "config/config.yaml" in cfg


@pytest.mark.workflow
def test_report_shows_every_figure_table_and_page(tiny_workflow):
    """`snakemake --report` on the tiny workflow's results: one self-contained HTML file that embeds
    every figure the workflow drew, every table page, the configuration and the description."""
    import base64
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--report", "results/report.html", "--configfile", "config/quick.yaml",
         "tiny.yaml"], cwd=tiny_workflow, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    html = (tiny_workflow / "results/report.html").read_text()
    pngs = sorted((tiny_workflow / "results/figures").rglob("*.png"))
    assert sorted(str(p.relative_to(tiny_workflow / "results/figures")) for p in pngs) == [
        "explosion/accuracy_vs_lambda.png", "explosion/grad_norm_traces.png",
        "mlp/lambda_search.png", "mlp/lambda_sweep.png", "mlp/optimizer_states.png", "mlp/search_trials.png",
        "mlp/task_curves.png",
        "pruning/global.png", "pruning/per_layer.png",
    ]
    for png in pngs:
        assert png.with_suffix(".pdf").exists()
        assert f'"{png.relative_to(tiny_workflow)}"' in html
        assert base64.b64encode(png.read_bytes()).decode() in html, f"{png.name} is not embedded"
    # Table 1, Table 2 (pruning thresholds), Table 3 (explosion summary) and the other pages
    for page in ("table1_continual", "optimizer_states", "sweep_runs", "pruning_thresholds",
                 "explosion/explosion_summary", "continual_runs", "provenance", "configuration"):
        assert f'"results/report/{page}.html"' in html
    assert "Reproduction of Kutalev" in html  # workflow/report/workflow.rst
    assert "Sections 2-3: continual learning" in html and "Configuration and provenance" in html
    assert '<script src="http' not in html  # nothing fetched when opened
    summary = json.loads((tiny_workflow / "results/tables/provenance.json").read_text())
    assert summary["n_records"] == (4 + 1) * 2 * 2 + 2 * 2 * 2 + 4 and summary["inconsistent_fields"] == []


def test_throughput_figure_has_a_panel_per_arch_a_bar_per_row_and_the_floors(tmp_path):
    from ewcstab.figures.throughput import plot_throughput

    rows = [{"arch": a, "engine": "engine", "runs": r, "seconds_per_run": sec, "flops_per_run": 4e12,
             "floor_seconds": floor, "floor_ratio": sec / floor}
            for a, r, sec, floor in (("mlp", 1, 90.0, 45.0), ("mlp", 4, 70.0, 42.0), ("cnn", 1, 900.0, 400.0))]
    rows.append({"arch": "mlp", "engine": "autograd @0230949", "runs": 1, "seconds_per_run": 110.0,
                 "floor_ratio_best": 2.75})
    result = {"rows": rows, "threads": 1, "device": "x86_64", "device_type": "cpu", "matmul_flops": {"best": 1.0e11}}
    fig = plot_throughput(result)
    mlp, cnn = fig.axes[:2]
    assert [round(p.get_height(), 6) for p in mlp.patches] == [90.0, 70.0, 110.0]
    assert [t.get_text() for t in mlp.get_xticklabels()] == ["one at a time\nR=1", "stacked\nR=4",
                                                            "autograd\n@0230949"]
    assert [round(p.get_height(), 6) for p in cnn.patches] == [900.0]
    assert round(mlp.lines[-1].get_ydata()[0], 6) == 40.0  # the floor at the best speed: 4e12 / 1e11
    figures.save_figure(fig, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 10_000
