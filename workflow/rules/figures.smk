# One rule per figure, each PNG (shown in the report) and PDF. The figures are drawn by
# ewcstab.figures from the tidy tables; categories follow the paper's sections.


rule plot_lambda_search:
    input:
        trials=get_arch_trials_files,
        runs=RUNS_TABLE,
        table1=TABLE1[0],
    output:
        png=report(
            LAMBDA_SEARCH_FIG["png"],
            caption="../report/lambda_search.rst",
            category="Sections 2-3: continual learning",
            subcategory="{arch}",
            labels={"figure": "accuracy vs lambda", "arch": "{arch}"},
        ),
        pdf=LAMBDA_SEARCH_FIG["pdf"],
    log:
        "logs/figures/{arch}/lambda_search.log",
    benchmark:
        "benchmarks/figures/{arch}/lambda_search.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    script:
        "../scripts/plot_lambda_search.py"


rule plot_task_curves:
    input:
        runs=RUNS_TABLE,
        paper=config["paper_continual"],
    output:
        png=report(
            TASK_CURVES_FIG["png"],
            caption="../report/task_curves.rst",
            category="Sections 2-3: continual learning",
            subcategory="{arch}",
            labels={"figure": "accuracy after each task", "arch": "{arch}"},
        ),
        pdf=TASK_CURVES_FIG["pdf"],
    log:
        "logs/figures/{arch}/task_curves.log",
    benchmark:
        "benchmarks/figures/{arch}/task_curves.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    script:
        "../scripts/plot_task_curves.py"


rule plot_search_trials:
    input:
        trials=get_arch_trials_files,
    output:
        png=report(
            SEARCH_TRIALS_FIG["png"],
            caption="../report/search_trials.rst",
            category="Sections 2-3: continual learning",
            subcategory="{arch}",
            labels={"figure": "Optuna trials", "arch": "{arch}"},
        ),
        pdf=SEARCH_TRIALS_FIG["pdf"],
    log:
        "logs/figures/{arch}/search_trials.log",
    benchmark:
        "benchmarks/figures/{arch}/search_trials.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    script:
        "../scripts/plot_search_trials.py"


# A target only when config has a `pruning` section (get_report_targets); the curves table
# comes from the pruning rules.
rule plot_pruning_curves:
    input:
        curves=PRUNING_CURVES_TABLE,
        paper=get_paper_pruning,
    output:
        png=report(
            PRUNING_FIG["png"],
            caption="../report/pruning_curves.rst",
            category="Section 4: pruning",
            labels={"figure": "accuracy vs sparsity", "scope": "{scope}"},
        ),
        pdf=PRUNING_FIG["pdf"],
    log:
        "logs/figures/pruning/{scope}.log",
    benchmark:
        "benchmarks/figures/pruning/{scope}.tsv"
    wildcard_constraints:
        scope="global|per_layer",
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    script:
        "../scripts/plot_pruning_curves.py"


rule plot_lambda_sweep:
    input:
        sweep=SWEEP_TABLE,
        paper=config["paper_continual"],
    output:
        png=report(
            LAMBDA_SWEEP_FIG["png"],
            caption="../report/lambda_sweep.rst",
            category="Sections 2-3: continual learning",
            subcategory="{arch}",
            labels={"figure": "accuracy vs lambda, fixed grid", "arch": "{arch}"},
        ),
        pdf=LAMBDA_SWEEP_FIG["pdf"],
    log:
        "logs/figures/{arch}/lambda_sweep.log",
    benchmark:
        "benchmarks/figures/{arch}/lambda_sweep.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    script:
        "../scripts/plot_lambda_sweep.py"


rule plot_optimizer_states:
    input:
        states=STATES_TABLE[0],
        paper=config["paper_continual"],
    output:
        png=report(
            STATES_FIG["png"],
            caption="../report/optimizer_states.rst",
            category="Sections 2-3: continual learning",
            subcategory="{arch}",
            labels={"figure": "carried vs fresh optimizer state", "arch": "{arch}"},
        ),
        pdf=STATES_FIG["pdf"],
    log:
        "logs/figures/{arch}/optimizer_states.log",
    benchmark:
        "benchmarks/figures/{arch}/optimizer_states.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    script:
        "../scripts/plot_optimizer_states.py"
