# One Optuna study of lambda per (arch, method, variant), fanned out to
# `search.workers` worker jobs that share the study's storage. The storage and every
# trial's run records sit beside best_lambda.json but are not declared outputs, so an
# interrupted study resumes on rerun instead of being deleted.


rule tune_lambda:
    input:
        cfg=RUN_CONFIG,
    output:
        SEARCH_WORKER,
    log:
        "logs/search/{arch}/{method}/{variant}/worker{worker}.log",
    benchmark:
        "benchmarks/search/{arch}/{method}/{variant}/worker{worker}.tsv"
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
        shared=get_shared_flag,
        batch=get_trials_per_batch_flag,
        state=lambda w: get_state_flags(get_search_state()),
        device=lambda w: get_device("search"),
    shell:
        "ewcstab search --config {input.cfg} --arch {wildcards.arch} --method {wildcards.method}"
        " --variant {wildcards.variant} {params.flags} --storage {params.storage:q}"
        " --study-name {wildcards.arch}-{wildcards.method}-{wildcards.variant} {params.shared}"
        " {params.batch} {params.state} --device {params.device} --runs-dir {params.study_dir}/runs --threads {threads} --no-progress"
        " --worker-out {output} 2> {log}"


rule summarize_search:
    input:
        cfg=RUN_CONFIG,
        workers=get_search_workers,
    output:
        best=BEST_LAMBDA,
        trials=TRIALS,
    log:
        "logs/search/{arch}/{method}/{variant}/summary.log",
    benchmark:
        "benchmarks/search/{arch}/{method}/{variant}/summary.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    params:
        flags=get_search_flags,
        storage=get_storage,
        state=lambda w: get_state_flags(get_search_state()),
    shell:
        "ewcstab search-summary --config {input.cfg} --arch {wildcards.arch} --method {wildcards.method}"
        " --variant {wildcards.variant} {params.flags} {params.state} --storage {params.storage:q}"
        " --study-name {wildcards.arch}-{wildcards.method}-{wildcards.variant}"
        " --out {output.best} --trials-out {output.trials} 2> {log}"
