# One Optuna study of lambda per (arch, method, variant). The study's storage and every
# trial's run records sit beside best_lambda.json but are not declared outputs, so an
# interrupted study resumes on rerun instead of being deleted.


rule tune_lambda:
    input:
        cfg=RUN_CONFIG,
    output:
        best=BEST_LAMBDA,
        trials=TRIALS,
    log:
        "logs/search/{arch}/{method}/{variant}.log",
    benchmark:
        "benchmarks/search/{arch}/{method}/{variant}.tsv"
    conda:
        ENV
    threads: get_resources("search").get("threads", 1)
    resources:
        mem_mb=get_resources("search").get("mem_mb", 4000),
        runtime=get_resources("search").get("runtime", 600),
        gpu=get_resources("search").get("gpu", 0),
    params:
        flags=get_search_flags,
        storage=get_storage,
        study_dir=get_study_dir,
    shell:
        "ewcstab search --config {input.cfg} --arch {wildcards.arch} --method {wildcards.method}"
        " --variant {wildcards.variant} {params.flags} --storage {params.storage:q}"
        " --study-name {wildcards.arch}-{wildcards.method}-{wildcards.variant}"
        " --runs-dir {params.study_dir}/runs --threads {threads} --no-progress"
        " --out {output.best} --trials-out {output.trials} 2> {log}"
