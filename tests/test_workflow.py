"""The Snakemake workflow end to end on a tiny configuration, rebuilds, and config validation."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, copy_workflow
from test_latex import check_latex_table

pytestmark = pytest.mark.workflow

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of the workflow's files (the package itself is installed)."""
    return copy_workflow(tmp_path_factory.mktemp("wf"))


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        # targets first: --configfile takes every following word as a file
        [*SNAKEMAKE, *args, "--cores", "2", "--configfile", "config/quick.yaml", "tiny.yaml"],
        cwd=workdir, capture_output=True, text=True, timeout=timeout, env={**os.environ},
    )


@pytest.fixture(scope="module")
def finished(tiny_workflow) -> Path:
    """The tiny workflow run of conftest.py (shared with the report and notebook tests)."""
    return tiny_workflow


def test_outputs_exist_parse_and_have_expected_rows(finished):
    table = pd.read_csv(finished / "results/tables/table1_continual.csv")
    assert sorted(zip(table.arch, table.method, table.variant, table.optimizer_state)) == [
        ("mlp", m, v, s) for m in ("mas", "si") for v in ("original", "stabilized") for s in ("carried", "fresh")
    ]
    assert (table.n_runs == 2).all() and (table.n_diverged == 0).all() and (table.n_runs_lambda0 == 2).all()
    assert table.mean_acc_last.between(0.1, 1.0).all()
    assert table.paper_mean_acc_last.notna().all()  # all four are in the paper
    assert table.gap_in_paper_ci.notna().all()
    runs = pd.read_csv(finished / "results/tables/continual_runs.csv")
    # (4 studies x 2 final seeds + 2 baseline seeds) runs x 2 optimizer states x 2 tasks
    assert len(runs) == (4 * 2 + 2) * 2 * 2
    assert set(runs.role) == {"final", "baseline"} and set(runs.optimizer_state) == {"carried", "fresh"}
    sweep = pd.read_csv(finished / "results/tables/sweep_runs.csv")
    # 2 lambdas x 2 seeds x 2 optimizer states x 2 tasks
    assert len(sweep) == 16 and set(sweep.role) == {"sweep"} and sorted(set(sweep.lam)) == [1.0, 10.0]
    assert (finished / "results/figures/mlp/lambda_sweep.png").stat().st_size > 10_000
    states = pd.read_csv(finished / "results/tables/optimizer_states.csv")
    assert sorted(states.method) == ["lambda = 0", "mas", "mas", "si", "si"]  # 4 studies and the baseline
    assert (states.n_carried == 2).all() and (states.n_fresh == 2).all() and states.p.between(0, 1).all()
    md = (finished / "results/tables/table1_continual.md").read_text()
    assert "paper: acc (95% CI)" in md and md.count("\n| mlp") == 4
    assert "ours, carried: acc (95% CI)" in md and "ours, fresh: acc (95% CI)" in md
    tex = check_latex_table((finished / "results/tables/table1_continual.tex").read_text())
    assert len(tex) == 1 + 4 and [r[:3] for r in tex[1:]] == [
        ["mlp", m, v] for m in ("mas", "si") for v in ("original", "stabilized")
    ]
    for study in ("mas/original", "si/stabilized"):
        best = json.loads((finished / f"results/search/mlp/{study}/best_lambda.json").read_text())
        assert best["n_trials"]["complete"] + best["n_trials"]["pruned"] == 2
        trials = pd.read_csv(finished / f"results/search/mlp/{study}/trials.csv")
        assert len(trials) == 2 and "lam" in trials
        assert len(list((finished / f"results/search/mlp/{study}/runs").glob("trial*_seed*.json"))) >= 1
    carried = json.loads((finished / "results/runs/mlp/mas/original/carried/seed1.json").read_text())
    assert carried["config"]["optimizer_state"] == "carried" and carried["chain"]["predecessor_seed"] == 1_000_001
    rec = json.loads((finished / "results/runs/mlp/mas/original/fresh/seed0.json").read_text())
    assert rec["config"]["lam"] == pytest.approx(
        json.loads((finished / "results/search/mlp/mas/original/best_lambda.json").read_text())["best_lambda"]
    )
    assert (finished / "logs/search/mlp/mas/original/worker0.log").exists()
    assert (finished / "benchmarks/runs/mlp/baseline/fresh/seeds0_1.tsv").exists()


def test_deleting_a_table_rebuilds_only_that_table(finished):
    (finished / "results/tables/table1_continual.md").unlink()
    dry = snakemake(finished, "-n", "results/tables/table1_continual.md")
    assert dry.returncode == 0, dry.stderr
    jobs = dry.stdout + dry.stderr
    assert "make_table1" in jobs
    for rule in ("tune_lambda", "train_final", "train_baseline", "gather_runs"):
        assert f"rule {rule}:" not in jobs, f"{rule} would rerun"
    proc = snakemake(finished, "results/tables/table1_continual.md")
    assert proc.returncode == 0 and (finished / "results/tables/table1_continual.md").exists()


def test_asking_for_one_figure_rebuilds_just_that_figure(finished):
    figure = finished / "results/figures/mlp/task_curves.png"
    figure.unlink()
    dry = snakemake(finished, "-n", "results/figures/mlp/task_curves.png")
    assert dry.returncode == 0, dry.stderr
    jobs = dry.stdout + dry.stderr
    assert "rule plot_task_curves:" in jobs
    rules = set(re.findall(r"rule (\w+):", jobs))
    assert rules == {"plot_task_curves"}, f"more than the figure would run: {rules}"
    proc = snakemake(finished, "results/figures/mlp/task_curves.png")
    assert proc.returncode == 0 and figure.stat().st_size > 10_000


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("continual:\n  methods: [ewc]\n", "'ewc' is not one of ['fisher', 'mas', 'si', 'signal']"),
        ("continual:\n  final:\n    seeds: -1\n", "-1 is less than the minimum of 1"),
        ("device: tpu\n", "'tpu' does not match"),
        ("continual:\n  space:\n    mlp:\n      mas:\n        original: {low: -1, high: 3}\n",
         "-1 is less than or equal to the minimum of 0"),
        ("continual:\n  run:\n    epochz: 3\n", "Additional properties are not allowed ('epochz' was unexpected)"),
    ],
)
def test_bad_config_rejected_before_any_job(workdir, bad, needle):
    (workdir / "bad.yaml").write_text(bad)
    proc = subprocess.run(
        [*SNAKEMAKE, "-n", "--cores", "1", "--configfile", "config/quick.yaml", "bad.yaml"],
        cwd=workdir, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert needle in out, out[-2000:]


def test_default_config_lists_the_whole_paper_reproduction(workdir):
    proc = subprocess.run([*SNAKEMAKE, "-n", "--cores", "1"], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", out, re.MULTILINE)}
    # mlp: 4 methods x 2 variants; cnn: 3 methods x 2 variants = 14 studies, 20 seeds each, 2 baselines,
    # each in both optimizer states (carried, fresh)
    assert counts["tune_lambda"] == 14 and counts["summarize_search"] == 14
    assert counts["train_final"] == 2 * 280
    assert counts["train_baseline"] == 2 * 40
    assert counts["fetch_dataset"] == 2  # MNIST and Fashion-MNIST, once each


def test_demo_config_plans_the_quick_start(workdir):
    """README quick start: MAS at the paper's lambdas (fixed, no search), 3 seeds each, 3 at lambda = 0."""
    proc = subprocess.run([*SNAKEMAKE, "-n", "results/tables/table1_continual.md", "--cores", "1",
                           "--configfile", "config/demo.yaml"], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", out, re.MULTILINE)}
    assert counts == {"fetch_dataset": 1, "write_run_config": 1, "write_fixed_lambda": 2, "train_final": 6,
                      "train_baseline": 3, "gather_runs": 1, "make_table1": 1, "total": 15}
    assert "results/lambdas/mlp/mas/original/fixed_lambda.json" in out
    assert "results/runs/mlp/mas/stabilized/fresh/seed2.json" in out and "/carried/" not in out


def test_dry_run_shows_the_data_stage_before_any_training(workdir):
    proc = subprocess.run([*SNAKEMAKE, "-n", "-p", "--cores", "1", "--configfile", "config/quick.yaml", "tiny.yaml"],
                          cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    jobs = re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", out, re.M)
    names = [name for name, _ in jobs]
    fetches = [body for name, body in jobs if name == "fetch_dataset"]
    assert sorted(re.search(r"output: (\S+)", b).group(1) for b in fetches) == [
        "results/data/fmnist.json", "results/data/mnist.json"]  # one job per dataset
    first_training = min(i for i, n in enumerate(names) if n.startswith(("train", "tune", "prune", "trace")))
    assert max(i for i, n in enumerate(names) if n == "fetch_dataset") < first_training, names
    # training reads the run settings, which come from the data stage's manifests
    config_job = dict(jobs)["write_run_config"]
    assert "results/data/mnist.json" in re.search(r"input: (.*)", config_job).group(1)


def test_a_wrong_data_root_fails_in_the_data_job_and_creates_nothing(workdir):
    root = workdir / "mistyped" / "root"
    (workdir / "wrong_root.yaml").write_text(f"data_root: {root}\ndownload: true\n")
    proc = subprocess.run(
        [*SNAKEMAKE, "results/runs/mlp/baseline/fresh/seed0.json", "--cores", "2", "--configfile", "config/quick.yaml",
         "tiny.yaml", "wrong_root.yaml"], cwd=workdir, capture_output=True, text=True, timeout=300,
        env={**os.environ, "EWCSTAB_DATA": "", "no_proxy": "", "https_proxy": "http://127.0.0.1:9",
             "http_proxy": "http://127.0.0.1:9"},  # nothing can be fetched
    )
    assert proc.returncode != 0
    log = (workdir / "logs" / "data" / "mnist.log").read_text().strip().splitlines()
    assert len(log) == 1 and log[0].startswith(f"ewcstab: MNIST: not under data root '{root}'"), log
    assert "Error in rule fetch_dataset" in proc.stdout + proc.stderr
    assert not (workdir / "mistyped").exists()
    assert not (workdir / "results" / "data" / "mnist.json").exists()
    assert "rule train_baseline" not in proc.stdout + proc.stderr


def test_lint_and_format_are_clean():
    lint = subprocess.run([*SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0 and "good condition" in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    fmt = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_slurm_profile_parses(workdir):
    proc = subprocess.run([*SNAKEMAKE, "-n", "--profile", "profiles/slurm", "--configfile", "config/quick.yaml"],
                          cwd=workdir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tune_lambda" in proc.stdout + proc.stderr


def test_pruning_outputs(finished):
    curves = pd.read_csv(finished / "results/tables/pruning_curves.csv")
    assert set(curves.importance) == {"magnitude", "fisher", "mas", "si", "signal"}
    assert set(curves.scope) == {"global", "per_layer"}
    assert set(curves.seed) == {0, 1}
    # 0, 0.01, ..., 1: 101 levels per (network, importance, scope)
    assert len(curves) == 2 * 5 * 2 * 101
    thresholds = pd.read_csv(finished / "results/tables/pruning_thresholds.csv")
    assert len(thresholds) == 5 * 2
    tex = check_latex_table((finished / "results/tables/pruning_thresholds.tex").read_text())
    assert len(tex) == 1 + len(thresholds)
    for scope in ("global", "per_layer"):
        assert (finished / f"results/figures/pruning/{scope}.png").stat().st_size > 10_000


def test_jobs_that_ask_for_a_gpu_train_on_cuda(tmp_path, data_root):
    """resources.<kind>.gpu > 0 with device auto: the runs are told `cuda`, so where CUDA is missing they fail
    with one line (ewcstab's device check) instead of training on the CPU."""
    work = copy_workflow(tmp_path)
    (work / "gpu.yaml").write_text(f"data_root: {data_root}\nresources:\n  search: {{gpu: 1}}\n  train: {{gpu: 1}}\n")
    proc = subprocess.run([*SNAKEMAKE, "results/configs/mlp.yaml", "--cores", "1", "--configfile",
                           "config/quick.yaml", "tiny.yaml", "gpu.yaml"], cwd=work, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load((work / "results/configs/mlp.yaml").read_text())["device"] == "cuda"
    dry = subprocess.run([*SNAKEMAKE, "-n", "-p", "--cores", "1", "--configfile", "config/quick.yaml", "tiny.yaml",
                          "gpu.yaml"], cwd=work, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    searches = re.findall(r"ewcstab search [^\n]*", dry.stdout + dry.stderr)
    assert searches and all("--device cuda" in line for line in searches)
