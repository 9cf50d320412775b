# Final runs: one job per seed at the study's best lambda, and the lambda = 0 baseline.


rule train_final:
    input:
        cfg=RUN_CONFIG,
        best=BEST_LAMBDA,
    output:
        FINAL_RUN,
    log:
        "logs/runs/{arch}/{method}/{variant}/seed{seed}.log",
    benchmark:
        "benchmarks/runs/{arch}/{method}/{variant}/seed{seed}.tsv"
    conda:
        ENV
    threads: get_resources("train").get("threads", 1)
    resources:
        mem_mb=get_resources("train").get("mem_mb", 4000),
        runtime=get_resources("train").get("runtime", 120),
        gpu=get_resources("train").get("gpu", 0),
    shell:
        "ewcstab run --config {input.cfg} --arch {wildcards.arch} --method {wildcards.method}"
        " --variant {wildcards.variant} --lam-from {input.best} --seed {wildcards.seed}"
        " --threads {threads} --no-progress --out {output} 2> {log}"


rule train_baseline:
    input:
        cfg=RUN_CONFIG,
    output:
        BASELINE_RUN,
    log:
        "logs/runs/{arch}/baseline/seed{seed}.log",
    benchmark:
        "benchmarks/runs/{arch}/baseline/seed{seed}.tsv"
    conda:
        ENV
    threads: get_resources("train").get("threads", 1)
    resources:
        mem_mb=get_resources("train").get("mem_mb", 4000),
        runtime=get_resources("train").get("runtime", 120),
        gpu=get_resources("train").get("gpu", 0),
    shell:
        "ewcstab run --config {input.cfg} --arch {wildcards.arch} --lam 0 --seed {wildcards.seed}"
        " --threads {threads} --no-progress --out {output} 2> {log}"
