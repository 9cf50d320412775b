# Run records -> one long-format CSV -> Table 1 (CSV, Markdown and LaTeX) with the paper's numbers.


rule gather_runs:
    input:
        final=get_final_records,
        baseline=get_baseline_records,
    output:
        RUNS_TABLE,
    log:
        "logs/aggregate/gather_runs.log",
    benchmark:
        "benchmarks/aggregate/gather_runs.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    shell:
        "ewcstab gather --final {input.final} --baseline {input.baseline} --out {output} 2> {log}"


rule make_table1:
    input:
        runs=RUNS_TABLE,
        search=get_best_lambda_files,
        paper=config["paper_continual"],
    output:
        csv=TABLE1[0],
        md=TABLE1[1],
        tex=TABLE1[2],
    log:
        "logs/aggregate/make_table1.log",
    benchmark:
        "benchmarks/aggregate/make_table1.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    shell:
        "ewcstab table --runs {input.runs} --search {input.search} --paper {input.paper}"
        " --csv-out {output.csv} --md-out {output.md} --tex-out {output.tex} 2> {log}"


rule compare_optimizer_states:
    input:
        runs=RUNS_TABLE,
    output:
        csv=STATES_TABLE[0],
        md=STATES_TABLE[1],
    log:
        "logs/aggregate/compare_optimizer_states.log",
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    shell:
        "ewcstab compare-states --runs {input.runs} --csv-out {output.csv} --md-out {output.md} 2> {log}"
