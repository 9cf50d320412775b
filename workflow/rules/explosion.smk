# The gradient-explosion study (paper Section 2): a lambda sweep over several orders of magnitude
# for each arch, method, penalty variant (original, stabilized, clipped), optimizer and seed, one
# run per job; a few traced runs per variant at a large lambda; tidy tables, a summary, two figures.
# Targets only when the config has an `explosion` section (get_explosion_targets).


rule write_explosion_config:
    input:
        data=get_explosion_datasets,
    output:
        EXPLOSION_CONFIG,
    log:
        "logs/explosion/configs/{arch}.log",
    benchmark:
        "benchmarks/explosion/configs/{arch}.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        settings=get_explosion_settings,
    script:
        "../scripts/write_run_config.py"


rule train_explosion:
    input:
        cfg=EXPLOSION_CONFIG,
    output:
        EXPLOSION_RUN,
    log:
        "logs/explosion/{arch}/{method}/{variant}/{optimizer}/lam{lam}/seed{seed}.log",
    benchmark:
        "benchmarks/explosion/{arch}/{method}/{variant}/{optimizer}/lam{lam}/seed{seed}.tsv"
    wildcard_constraints:
        optimizer="adam|sgd",
        lam=r"[0-9][0-9.e+-]*",
    conda:
        ENV
    threads: get_resources("train").get("threads", 1)
    resources:
        mem_mb=get_resources("train").get("mem_mb", 4000),
        runtime=get_resources("train").get("runtime", 120),
        gpu=get_resources("train").get("gpu", 0),
    params:
        lr=get_explosion_lr,
    shell:
        "ewcstab run --config {input.cfg} --arch {wildcards.arch} --method {wildcards.method}"
        " --variant {wildcards.variant} --optimizer {wildcards.optimizer} --lr {params.lr}"
        " --lam {wildcards.lam} --seed {wildcards.seed} --threads {threads} --no-progress"
        " --out {output} 2> {log}"


rule trace_explosion:
    input:
        cfg=EXPLOSION_CONFIG,
    output:
        EXPLOSION_TRACE,
    log:
        "logs/explosion/{arch}/traces/{variant}/{optimizer}.log",
    benchmark:
        "benchmarks/explosion/{arch}/traces/{variant}/{optimizer}.tsv"
    wildcard_constraints:
        optimizer="adam|sgd",
    conda:
        ENV
    threads: get_resources("train").get("threads", 1)
    resources:
        mem_mb=get_resources("train").get("mem_mb", 4000),
        runtime=get_resources("train").get("runtime", 120),
        gpu=get_resources("train").get("gpu", 0),
    params:
        lr=get_explosion_lr,
        lam=get_trace_lambda,
        method=get_trace_method,
    shell:
        "ewcstab run --config {input.cfg} --arch {wildcards.arch} --method {params.method}"
        " --variant {wildcards.variant} --optimizer {wildcards.optimizer} --lr {params.lr}"
        " --lam {params.lam} --seed 0 --trace --threads {threads} --no-progress"
        " --out {output} 2> {log}"


rule gather_explosion_runs:
    input:
        get_explosion_records,
    output:
        EXPLOSION_RUNS_TABLE,
    log:
        "logs/explosion/gather_runs.log",
    benchmark:
        "benchmarks/explosion/gather_runs.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    shell:
        "ewcstab explosion-gather --records {input} --out {output} 2> {log}"


rule summarize_explosion:
    input:
        EXPLOSION_RUNS_TABLE,
    output:
        csv=EXPLOSION_SUMMARY[0],
        md=EXPLOSION_SUMMARY[1],
        tex=EXPLOSION_SUMMARY[2],
    log:
        "logs/explosion/summarize.log",
    benchmark:
        "benchmarks/explosion/summarize.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    shell:
        "ewcstab explosion-summary --runs {input} --csv-out {output.csv} --md-out {output.md}"
        " --tex-out {output.tex} 2> {log}"


rule gather_explosion_traces:
    input:
        get_explosion_trace_records,
    output:
        EXPLOSION_TRACES_TABLE,
    log:
        "logs/explosion/gather_traces.log",
    benchmark:
        "benchmarks/explosion/gather_traces.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    shell:
        "ewcstab explosion-traces --records {input} --out {output} 2> {log}"


rule plot_explosion_accuracy:
    input:
        runs=EXPLOSION_RUNS_TABLE,
    output:
        png=report(
            EXPLOSION_ACCURACY_FIG["png"],
            caption="../report/explosion_accuracy.rst",
            category="Gradient explosion",
            subcategory="figures",
            labels={"figure": "accuracy vs lambda, per variant and optimizer"},
        ),
        pdf=EXPLOSION_ACCURACY_FIG["pdf"],
    log:
        "logs/figures/explosion/accuracy_vs_lambda.log",
    benchmark:
        "benchmarks/figures/explosion/accuracy_vs_lambda.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    script:
        "../scripts/plot_explosion_accuracy.py"


rule plot_explosion_traces:
    input:
        traces=EXPLOSION_TRACES_TABLE,
    output:
        png=report(
            EXPLOSION_TRACES_FIG["png"],
            caption="../report/explosion_traces.rst",
            category="Gradient explosion",
            subcategory="figures",
            labels={"figure": "gradient norm per step at a large lambda"},
        ),
        pdf=EXPLOSION_TRACES_FIG["pdf"],
    log:
        "logs/figures/explosion/grad_norm_traces.log",
    benchmark:
        "benchmarks/figures/explosion/grad_norm_traces.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    script:
        "../scripts/plot_explosion_traces.py"


rule render_explosion_table:
    input:
        TABLE_CSV,
    output:
        report(
            EXPLOSION_REPORT_TABLE,
            caption="../report/explosion_table.rst",
            category="Gradient explosion",
            subcategory="tables",
            labels={"table": "{table}"},
        ),
    log:
        "logs/report/explosion/{table}.log",
    benchmark:
        "benchmarks/report/explosion/{table}.tsv"
    wildcard_constraints:
        table="explosion_[a-z0-9_]+",
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    script:
        "../scripts/render_table.py"
