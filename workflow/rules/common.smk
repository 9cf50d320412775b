# Input functions and helpers for every rule file. Paths spell out the experiment axes.

from types import SimpleNamespace

# The workflow's own folder, for envs/ewcstab.post-deploy.sh (it installs the package from here when
# `--sdm conda` creates the environment; Snakemake's working directory may be elsewhere).
os.environ.update(EWCSTAB_WORKFLOW_DIR=os.path.realpath(workflow.basedir))


wildcard_constraints:
    arch="mlp|cnn|attention",
    method="fisher|mas|si|signal",
    variant="original|stabilized|clipped",
    seed=r"\d+",
    state="fresh|carried",
    worker=r"\d+",
    importance_data="test|heldout",
    dataset="mnist|fmnist",


ENV = "../../envs/ewcstab.yaml"
DATA_MANIFEST = "results/data/{dataset}.json"
RUN_CONFIG = "results/configs/{arch}.yaml"
BEST_LAMBDA = "results/search/{arch}/{method}/{variant}/best_lambda.json"
TRIALS = "results/search/{arch}/{method}/{variant}/trials.csv"
SEARCH_WORKER = "results/search/{arch}/{method}/{variant}/workers/worker{worker}.json"
FIXED_LAMBDA = "results/lambdas/{arch}/{method}/{variant}/fixed_lambda.json"
FINAL_RUN = "results/runs/{arch}/{method}/{variant}/{state}/seed{seed}.json"
BASELINE_RUN = "results/runs/{arch}/baseline/{state}/seed{seed}.json"
SWEEP_RUN = "results/sweeps/{arch}/{method}/{variant}/{state}/lam{lam}/seed{seed}.json"
SWEEP_TABLE = "results/tables/sweep_runs.csv"
RUNS_TABLE = "results/tables/continual_runs.csv"
TABLE1 = multiext("results/tables/table1_continual", ".csv", ".md", ".tex")
STATES_TABLE = multiext("results/tables/optimizer_states", ".csv", ".md")


def get_studies():
    """(arch, method, variant) selected in config with a lambda range in `space` or a fixed lambda."""
    c = config["continual"]
    return [
        (a, m, v)
        for a in c["archs"]
        for m in c["methods"]
        for v in c["variants"]
        if v in c["space"].get(a, {}).get(m, {})
        or get_fixed_lambda(a, m, v) is not None
    ]


def get_archs():
    """Architectures with at least one study."""
    return sorted({a for a, _, _ in get_studies()})


def get_states():
    """Optimizer states the final runs, baselines and sweeps are trained in (`continual.optimizer_states`)."""
    return config["continual"].get("optimizer_states", ["fresh"])


def compares_states():
    """Whether runs are trained in both optimizer states (then the comparison table and figure are built)."""
    return set(get_states()) == {"carried", "fresh"}


def get_search_state():
    """The optimizer state of the search's runs: the first of `continual.optimizer_states`."""
    return get_states()[0]


def get_chain_length():
    """Counted runs per carried chain (`continual.chain_length`)."""
    return config["continual"].get("chain_length", 1)


def get_state_flags(state):
    """The run flags of an optimizer state (the chain length only matters when carried)."""
    return f"--optimizer-state {state} --chain-length {get_chain_length()}"


def get_fixed_lambda(arch, method, variant):
    """A lambda fixed in config (`continual.fixed_lambda`) for a study, or None (searched)."""
    fixed = config["continual"].get("fixed_lambda", {})
    return fixed.get(arch, {}).get(method, {}).get(variant)


def get_lambda_file(wildcards):
    """The JSON whose `best_lambda` the final runs use: a fixed lambda's file, else the search's result."""
    path = (
        FIXED_LAMBDA
        if get_fixed_lambda(wildcards.arch, wildcards.method, wildcards.variant)
        is not None
        else BEST_LAMBDA
    )
    return path.format(
        arch=wildcards.arch, method=wildcards.method, variant=wildcards.variant
    )


def get_run_settings(wildcards):
    """RunConfig settings shared by every run of an arch: `run`, then `run_per_arch`, then the device
    (the data root and `download: false` come from the data stage, workflow/scripts/write_run_config.py).
    """
    c = config["continual"]
    settings = {**c["run"], **c.get("run_per_arch", {}).get(wildcards.arch, {})}
    settings.update(arch=wildcards.arch, device=get_device("train"))
    return settings


def get_device(kind):
    """The device of one kind of job: config `device`, but `cuda` where that kind asks for a GPU
    (`resources.<kind>.gpu` > 0) and the device is `auto`: such a job then fails with one line where
    CUDA is missing instead of training on the CPU."""
    device = config["device"]
    if device == "auto" and get_resources(kind).get("gpu", 0) > 0:
        return "cuda"
    return device


# The paper's task sequence of each arch and the datasets of each sequence (as ewcstab.config and
# ewcstab.data define them; the Snakefile does not import the package, which may live in a conda env).
DEFAULT_SEQUENCE = {
    "mlp": "permuted_mnist",
    "cnn": "mnist_fmnist_rot90",
    "attention": "mnist_fmnist_rot90",
}
SEQUENCE_DATASETS = {
    "permuted_mnist": ["mnist"],
    "mnist_fmnist_rot90": ["mnist", "fmnist"],
}


def get_datasets(settings):
    """Data manifests of the datasets a run with these settings reads."""
    sequence = settings.get("sequence") or DEFAULT_SEQUENCE[settings["arch"]]
    return [DATA_MANIFEST.format(dataset=d) for d in SEQUENCE_DATASETS[sequence]]


def get_run_datasets(wildcards):
    """Data manifests the runs of an arch depend on (the data stage, workflow/rules/data.smk)."""
    return get_datasets(get_run_settings(wildcards))


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


def get_trials_per_batch_flag(wildcards):
    """Batched trials (`search.trials_per_batch`); no flag at the default 1 (commands unchanged)."""
    k = config["continual"]["search"].get("trials_per_batch", 1)
    return f"--trials-per-batch {k}" if k > 1 else ""


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


def get_final_packs():
    """Final seeds in groups of `final.seeds_per_job`, each trained by one batched job
    (workflow/rules/final.smk); None when every seed is its own job (the default)."""
    size = config["continual"]["final"].get("seeds_per_job", 1)
    check_chains("final.seeds_per_job", size)
    if size <= 1:
        return None
    seeds = list(get_final_seeds())
    return [seeds[i : i + size] for i in range(0, len(seeds), size)]


def check_chains(key, seeds_per_job):
    """Carried chains must not cross jobs: the chain length divides the seeds of a job."""
    length = get_chain_length()
    if "carried" in get_states() and seeds_per_job % length:
        raise ValueError(
            f"continual.{key}: {seeds_per_job} is not a multiple of continual.chain_length {length}; "
            "a carried chain must be trained by one job"
        )


def get_sweeps():
    """The lambda sweeps of `continual.sweeps` (arch, method, variant, lambdas, seeds)."""
    sweeps = config["continual"].get("sweeps", [])
    for sweep in sweeps:
        check_chains("sweeps.seeds", sweep["seeds"])
    return sweeps


def sweep_groups(sweep):
    """The sweep's lambdas in consecutive groups of `lambdas_per_job` (default 1), one job each."""
    lams, size = sweep["lambdas"], sweep.get("lambdas_per_job", 1)
    return [lams[i : i + size] for i in range(0, len(lams), size)]


def get_sweep_records(wildcards=None):
    """Every run of every sweep, in every optimizer state."""
    return [
        SWEEP_RUN.format(
            arch=w["arch"],
            method=w["method"],
            variant=w["variant"],
            state=st,
            lam=lam_label(lam),
            seed=s,
        )
        for w in get_sweeps()
        for st in get_states()
        for lam in w["lambdas"]
        for s in range(w["seeds"])
    ]


def get_final_records(wildcards=None):
    return [
        FINAL_RUN.format(arch=a, method=m, variant=v, state=st, seed=s)
        for a, m, v in get_studies()
        for st in get_states()
        for s in get_final_seeds()
    ]


def get_baseline_records(wildcards=None):
    if not config["continual"]["final"].get("baseline", True):
        return []
    return [
        BASELINE_RUN.format(arch=a, state=st, seed=s)
        for a in get_archs()
        for st in get_states()
        for s in get_final_seeds()
    ]


def get_searched_studies():
    """The studies whose lambda is searched (not fixed in config)."""
    return [(a, m, v) for a, m, v in get_studies() if get_fixed_lambda(a, m, v) is None]


def get_best_lambda_files(wildcards=None):
    """The lambda file of every study: the search's best_lambda.json, or the fixed lambda's file."""
    return [
        get_lambda_file(SimpleNamespace(arch=a, method=m, variant=v))
        for a, m, v in get_studies()
    ]


def get_trials_files(wildcards=None):
    return [
        TRIALS.format(arch=a, method=m, variant=v) for a, m, v in get_searched_studies()
    ]


def get_all_targets():
    """Everything `snakemake` builds by default."""
    targets = [*TABLE1, RUNS_TABLE, *get_trials_files()]
    targets += [*STATES_TABLE] if compares_states() else []
    return targets + ([SWEEP_TABLE] if get_sweeps() else [])


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
STATES_FIG = {
    "png": "results/figures/{arch}/optimizer_states.png",
    "pdf": "results/figures/{arch}/optimizer_states.pdf",
}
LAMBDA_SWEEP_FIG = {
    "png": "results/figures/{arch}/lambda_sweep.png",
    "pdf": "results/figures/{arch}/lambda_sweep.pdf",
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
    """trials.csv of every searched study of one arch."""
    return [
        TRIALS.format(arch=a, method=m, variant=v)
        for a, m, v in get_searched_studies()
        if a == wildcards.arch
    ]


def get_provenance_records(wildcards=None):
    """Every JSON record that carries provenance: final, baseline and sweep runs, search results."""
    return [
        *get_final_records(),
        *get_baseline_records(),
        *get_sweep_records(),
        *[
            BEST_LAMBDA.format(arch=a, method=m, variant=v)
            for a, m, v in get_searched_studies()
        ],
    ]


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
    """Tables rendered as HTML pages for the report: each only where the configuration builds it."""
    tables = ["table1_continual", "continual_runs", "provenance"]
    tables += ["optimizer_states"] if compares_states() else []
    tables += ["sweep_runs"] if get_sweeps() else []
    return tables + (["pruning_thresholds"] if pruning_enabled() else [])


def get_report_targets():
    """Figures (PNG and PDF), provenance and the report's pages: `rule all` builds them."""
    targets = [*PROVENANCE, REPORT_CONFIG]
    searched = {a for a, _, _ in get_searched_studies()}
    swept = {w["arch"] for w in get_sweeps()}
    for arch in get_archs():
        figs = [TASK_CURVES_FIG]
        figs += [LAMBDA_SEARCH_FIG, SEARCH_TRIALS_FIG] if arch in searched else []
        figs += [LAMBDA_SWEEP_FIG] if arch in swept else []
        figs += [STATES_FIG] if compares_states() else []
        for fig in figs:
            targets += [f.format(arch=arch) for f in fig.values()]
    if pruning_enabled():
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


# The gradient-explosion study (workflow/rules/explosion.smk), only with an `explosion` section.
EXPLOSION_CONFIG = "results/explosion/configs/{arch}.yaml"
EXPLOSION_RUN = (
    "results/explosion/{arch}/{method}/{variant}/{optimizer}/lam{lam}/seed{seed}.json"
)
EXPLOSION_TRACE = "results/explosion/{arch}/traces/{variant}/{optimizer}.json"
EXPLOSION_RUNS_TABLE = "results/tables/explosion_runs.csv"
EXPLOSION_TRACES_TABLE = "results/tables/explosion_traces.csv"
EXPLOSION_SUMMARY = multiext("results/tables/explosion_summary", ".csv", ".md", ".tex")
EXPLOSION_ACCURACY_FIG = {
    "png": "results/figures/explosion/accuracy_vs_lambda.png",
    "pdf": "results/figures/explosion/accuracy_vs_lambda.pdf",
}
EXPLOSION_TRACES_FIG = {
    "png": "results/figures/explosion/grad_norm_traces.png",
    "pdf": "results/figures/explosion/grad_norm_traces.pdf",
}
EXPLOSION_REPORT_TABLE = "results/report/explosion/{table}.html"


def lam_label(lam):
    """A lambda as it appears in paths: plain digits, no trailing .0 (1000, 0.5, 1e+20)."""
    return f"{float(lam):.12g}"


def get_explosion_lambdas(arch):
    """The lambda sweep of one arch (`explosion.lambdas`); an arch without one is a config error."""
    lambdas = config["explosion"]["lambdas"].get(arch)
    if not lambdas:
        raise ValueError(
            f"explosion.lambdas.{arch}: missing; every arch in explosion.archs needs a list of lambdas"
        )
    return lambdas


def per_arch(value, arch, key):
    """A setting given as one number for every arch or as arch -> number."""
    if isinstance(value, dict):
        value = value.get(arch)
    if value is None:
        raise ValueError(f"explosion.{key}: no value for arch {arch!r}")
    return value


def get_explosion_lr(wildcards):
    """Learning rate of the run's optimizer and arch (`explosion.lr`); the stabilized alpha follows it."""
    lr = config["explosion"]["lr"].get(wildcards.optimizer)
    return per_arch(lr, wildcards.arch, f"lr.{wildcards.optimizer}")


def get_explosion_settings(wildcards):
    """RunConfig settings shared by an arch's study runs: `run`, then `run_per_arch`, clip_norm, device."""
    e = config["explosion"]
    settings = {**e.get("run", {}), **e.get("run_per_arch", {}).get(wildcards.arch, {})}
    settings.update(
        arch=wildcards.arch,
        clip_norm=per_arch(e.get("clip_norm", 1.0), wildcards.arch, "clip_norm"),
        device=get_device("train"),
    )
    return settings


def get_explosion_datasets(wildcards):
    """Data manifests the study runs of an arch depend on."""
    return get_datasets(get_explosion_settings(wildcards))


def get_explosion_records(wildcards=None):
    """Every run of the sweep: arch x method x variant x optimizer x lambda x seed (seeds per arch or not)."""
    e = config["explosion"]
    return [
        EXPLOSION_RUN.format(
            arch=a, method=m, variant=v, optimizer=o, lam=lam_label(lam), seed=s
        )
        for a in e["archs"]
        for m in e["methods"]
        for v in e["variants"]
        for o in e["optimizers"]
        for lam in get_explosion_lambdas(a)
        for s in range(per_arch(e["seeds"], a, "seeds"))
    ]


def get_explosion_trace_archs():
    """Selected archs that have a `trace_lambda`: each gets one traced run per variant and optimizer."""
    e = config["explosion"]
    return [a for a in e["archs"] if e.get("trace_lambda", {}).get(a) is not None]


def get_explosion_trace_records(wildcards=None):
    """The traced runs (first method, seed 0, lambda `trace_lambda`), one per arch, variant, optimizer."""
    e = config["explosion"]
    return [
        EXPLOSION_TRACE.format(arch=a, variant=v, optimizer=o)
        for a in get_explosion_trace_archs()
        for v in e["variants"]
        for o in e["optimizers"]
    ]


def get_trace_lambda(wildcards):
    """Lambda of an arch's traced runs."""
    return lam_label(config["explosion"]["trace_lambda"][wildcards.arch])


def get_trace_method(wildcards=None):
    """Importance of the traced runs: the first of `explosion.methods`."""
    return config["explosion"]["methods"][0]


def explosion_enabled():
    """The study runs when config has an `explosion` section with at least one arch."""
    return bool(config.get("explosion", {}).get("archs"))


def pruning_enabled():
    """Section 4 runs when config has a `pruning` section with at least one arch."""
    return bool(config.get("pruning", {}).get("archs"))


def get_explosion_targets():
    """Tables, figures and report pages of the study; nothing without an `explosion` section."""
    if not explosion_enabled():
        return []
    targets = [
        EXPLOSION_RUNS_TABLE,
        *EXPLOSION_SUMMARY,
        *EXPLOSION_ACCURACY_FIG.values(),
        EXPLOSION_REPORT_TABLE.format(table="explosion_summary"),
    ]
    if get_explosion_trace_archs():
        targets += [EXPLOSION_TRACES_TABLE, *EXPLOSION_TRACES_FIG.values()]
    return targets


# --- pruning (Section 4) ---------------------------------------------------------------
PRUNE_NET = "results/pruning/{arch}/{importance_data}/net{seed}.csv"
PRUNE_NET_META = "results/pruning/{arch}/{importance_data}/net{seed}.json"
PRUNING_MEAN_TABLE = "results/tables/pruning_mean_curves.csv"
PRUNING_THRESHOLDS = "results/tables/pruning_thresholds.csv"
PRUNING_THRESHOLDS_MD = "results/tables/pruning_thresholds.md"
PRUNING_THRESHOLDS_TEX = "results/tables/pruning_thresholds.tex"


def get_pruning_nets(wildcards=None):
    """One curve table per (arch, importance data, network)."""
    p = config.get("pruning", {})
    return [
        PRUNE_NET.format(arch=a, importance_data=d, seed=s)
        for a in p.get("archs", [])
        for d in p.get("importance_data", ["test"])
        for s in range(p.get("networks", 10))
    ]


def get_pruning_flags(wildcards):
    """ewcstab prune flags from the `pruning` section (training overrides, importances, grid)."""
    p = config["pruning"]
    flags = [
        "--importances " + " ".join(p.get("importances", [])),
        "--scopes " + " ".join(get_pruning_scopes()),
        f"--sparsity-step {p.get('sparsity_step', 0.001)}",
        f"--device {get_device('train')}",
    ]
    if config.get("data_root"):
        flags.append(f"--data-root {config['data_root']}")
    for key, value in p.get("run", {}).items():
        if value is not None:
            flags.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(flags)


def get_pruning_targets():
    """Pruning tables, when config has a `pruning` section."""
    if not pruning_enabled():
        return []
    return [
        PRUNING_CURVES_TABLE,
        PRUNING_MEAN_TABLE,
        PRUNING_THRESHOLDS,
        PRUNING_THRESHOLDS_MD,
        PRUNING_THRESHOLDS_TEX,
    ]
