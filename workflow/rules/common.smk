# Input functions and helpers for every rule file. Paths spell out the experiment axes.


wildcard_constraints:
    arch="mlp|cnn|attention",
    method="fisher|mas|si|signal",
    variant="original|stabilized|clipped",
    seed=r"\d+",
    worker=r"\d+",


ENV = "../../envs/ewcstab.yaml"
RUN_CONFIG = "results/configs/{arch}.yaml"
BEST_LAMBDA = "results/search/{arch}/{method}/{variant}/best_lambda.json"
TRIALS = "results/search/{arch}/{method}/{variant}/trials.csv"
SEARCH_WORKER = "results/search/{arch}/{method}/{variant}/workers/worker{worker}.json"
FINAL_RUN = "results/runs/{arch}/{method}/{variant}/seed{seed}.json"
BASELINE_RUN = "results/runs/{arch}/baseline/seed{seed}.json"
RUNS_TABLE = "results/tables/continual_runs.csv"
TABLE1 = multiext("results/tables/table1_continual", ".csv", ".md")


def get_studies():
    """(arch, method, variant) selected in config and given a lambda range in `space`."""
    c = config["continual"]
    return [
        (a, m, v)
        for a in c["archs"]
        for m in c["methods"]
        for v in c["variants"]
        if v in c["space"].get(a, {}).get(m, {})
    ]


def get_archs():
    """Architectures with at least one study."""
    return sorted({a for a, _, _ in get_studies()})


def get_run_settings(wildcards):
    """RunConfig settings shared by every run of an arch: `run`, then `run_per_arch`, then data/device."""
    c = config["continual"]
    settings = {**c["run"], **c.get("run_per_arch", {}).get(wildcards.arch, {})}
    settings.update(
        arch=wildcards.arch,
        device=config["device"],
        download=config["download"],
        data_root=config["data_root"],
    )
    return settings


def get_space(wildcards):
    """Lambda range (and paper grid) of one study."""
    return config["continual"]["space"][wildcards.arch][wildcards.method][
        wildcards.variant
    ]


def get_search_flags(wildcards):
    """ewcstab search flags for the study's mode, range, trials and seeds."""
    s, space = config["continual"]["search"], get_space(wildcards)
    flags = [
        f"--mode {s['mode']}",
        f"--low {space['low']}",
        f"--high {space['high']}",
        f"--n-trials {s['n_trials']}",
        f"--seeds-per-trial {s['seeds_per_trial']}",
        f"--pruner {s.get('pruner', 'median')}",
        f"--sampler-seed {s.get('sampler_seed', 0)}",
    ]
    if s["mode"] == "grid":
        lo, hi, n = space["grid"]
        flags += [f"--low {lo}", f"--high {hi}", f"--grid-n {n}", f"--n-trials {n}"]
    return " ".join(flags)


def get_storage(wildcards):
    """Optuna storage URL: config value, else one SQLite file per study (kept across reruns)."""
    url = config["continual"]["search"].get("storage")
    if url:
        return url
    return "sqlite:///" + str(Path(get_study_dir(wildcards), "study.db"))


def get_study_dir(wildcards):
    """Folder of a study's side files (storage, trial run records); not a declared output."""
    return str(Path(BEST_LAMBDA.format(**wildcards)).parent)


def get_search_workers(wildcards):
    """One output per worker job of a study (`search.workers`, default 1)."""
    n = config["continual"]["search"].get("workers", 1)
    return [SEARCH_WORKER.format(worker=k, **wildcards) for k in range(n)]


def get_shared_flag(wildcards):
    """Workers that share a study must not fail each other's running trials at start."""
    return "--shared" if config["continual"]["search"].get("workers", 1) > 1 else ""


def get_final_seeds():
    return range(config["continual"]["final"]["seeds"])


def get_final_records(wildcards=None):
    return [
        FINAL_RUN.format(arch=a, method=m, variant=v, seed=s)
        for a, m, v in get_studies()
        for s in get_final_seeds()
    ]


def get_baseline_records(wildcards=None):
    if not config["continual"]["final"].get("baseline", True):
        return []
    return [
        BASELINE_RUN.format(arch=a, seed=s)
        for a in get_archs()
        for s in get_final_seeds()
    ]


def get_best_lambda_files(wildcards=None):
    return [
        BEST_LAMBDA.format(arch=a, method=m, variant=v) for a, m, v in get_studies()
    ]


def get_trials_files(wildcards=None):
    return [TRIALS.format(arch=a, method=m, variant=v) for a, m, v in get_studies()]


def get_all_targets():
    """Everything `snakemake` builds by default."""
    return [*TABLE1, RUNS_TABLE, *get_trials_files()]


def get_resources(kind):
    """Resources of a rule kind (search, train, aggregate) from config."""
    return config.get("resources", {}).get(kind, {})


# Figures and report pages (workflow/rules/figures.smk, workflow/rules/report.smk).
# Plain strings, not multiext: report() flags an annotated path in place, and the flag would
# follow every path formatted from it (rule all's inputs), where {arch} cannot be resolved.
LAMBDA_SEARCH_FIG = {
    "png": "results/figures/{arch}/lambda_search.png",
    "pdf": "results/figures/{arch}/lambda_search.pdf",
}
TASK_CURVES_FIG = {
    "png": "results/figures/{arch}/task_curves.png",
    "pdf": "results/figures/{arch}/task_curves.pdf",
}
SEARCH_TRIALS_FIG = {
    "png": "results/figures/{arch}/search_trials.png",
    "pdf": "results/figures/{arch}/search_trials.pdf",
}
PRUNING_FIG = {
    "png": "results/figures/pruning/{scope}.png",
    "pdf": "results/figures/pruning/{scope}.pdf",
}
PRUNING_CURVES_TABLE = "results/tables/pruning_curves.csv"
PROVENANCE = multiext("results/tables/provenance", ".csv", ".json")
TABLE_CSV = "results/tables/{table}.csv"
REPORT_TABLE = "results/report/{table}.html"
REPORT_CONFIG = "results/report/configuration.html"


def get_arch_trials_files(wildcards):
    """trials.csv of every study of one arch."""
    return [
        TRIALS.format(arch=a, method=m, variant=v)
        for a, m, v in get_studies()
        if a == wildcards.arch
    ]


def get_provenance_records(wildcards=None):
    """Every JSON record that carries provenance: final and baseline runs, search results."""
    return [*get_final_records(), *get_baseline_records(), *get_best_lambda_files()]


def get_pruning_scopes():
    """Pruning scopes of the figures: the `pruning` section's `scopes`, else both."""
    return config.get("pruning", {}).get("scopes", ["global", "per_layer"])


def get_paper_pruning(wildcards=None):
    """The paper's pruning table, drawn beside ours if config names it (`paper_pruning` or `pruning.paper`)."""
    return config.get("paper_pruning") or config.get("pruning", {}).get("paper") or []


def get_configfiles():
    """The config files merged into this run's configuration (relative to the working directory)."""
    return [os.path.relpath(f) for f in workflow.configfiles]


def get_report_tables():
    """Tables rendered as HTML pages for the report; pruning's only with a `pruning` section."""
    tables = ["table1_continual", "continual_runs", "provenance"]
    return tables + (["pruning_thresholds"] if config.get("pruning") else [])


def get_report_targets():
    """Figures (PNG and PDF), provenance and the report's pages: `rule all` builds them."""
    targets = [*PROVENANCE, REPORT_CONFIG]
    for arch in get_archs():
        for fig in (LAMBDA_SEARCH_FIG, TASK_CURVES_FIG, SEARCH_TRIALS_FIG):
            targets += [f.format(arch=arch) for f in fig.values()]
    if config.get("pruning"):
        targets += [
            f.format(scope=s)
            for s in get_pruning_scopes()
            for f in PRUNING_FIG.values()
        ]
    return targets + [REPORT_TABLE.format(table=t) for t in get_report_tables()]


def get_table_category(wildcards):
    """Report category of a rendered table: the paper section it belongs to."""
    if wildcards.table == "provenance":
        return "Configuration and provenance"
    if wildcards.table.startswith("pruning"):
        return "Section 4: pruning"
    return "Sections 2-3: continual learning"


def get_table_subcategory(wildcards):
    """Report subcategory of a rendered table."""
    return "provenance" if wildcards.table == "provenance" else "tables"
