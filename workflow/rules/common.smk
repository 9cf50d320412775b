# Input functions and helpers for every rule file. Paths spell out the experiment axes.


wildcard_constraints:
    arch="mlp|cnn|attention",
    method="fisher|mas|si|signal",
    variant="original|stabilized|clipped",
    seed=r"\d+",


ENV = "../../envs/ewcstab.yaml"
RUN_CONFIG = "results/configs/{arch}.yaml"
BEST_LAMBDA = "results/search/{arch}/{method}/{variant}/best_lambda.json"
TRIALS = "results/search/{arch}/{method}/{variant}/trials.csv"
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
