# Final runs at the study's lambda (the search's best, or one fixed in config) and the lambda = 0
# baseline, in every optimizer state of `continual.optimizer_states` (one job per seed, or batched
# groups of seeds; a carried chain is always trained by one job).


rule write_fixed_lambda:
    output:
        FIXED_LAMBDA,
    log:
        "logs/lambdas/{arch}/{method}/{variant}.log",
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        lam=lambda w: get_fixed_lambda(w.arch, w.method, w.variant),
    script:
        "../scripts/write_fixed_lambda.py"


if get_final_packs() is None:

    rule train_final:
        input:
            cfg=RUN_CONFIG,
            best=get_lambda_file,
        output:
            FINAL_RUN,
        log:
            "logs/runs/{arch}/{method}/{variant}/{state}/seed{seed}.log",
        benchmark:
            "benchmarks/runs/{arch}/{method}/{variant}/{state}/seed{seed}.tsv"
        conda:
            ENV
        threads: get_resources("train").get("threads", 1)
        resources:
            mem_mb=get_resources("train").get("mem_mb", 4000),
            runtime=get_resources("train").get("runtime", 120),
            gpu=get_resources("train").get("gpu", 0),
        params:
            state=lambda w: get_state_flags(w.state),
        shell:
            "ewcstab run --config {input.cfg} --arch {wildcards.arch} --method {wildcards.method}"
            " --variant {wildcards.variant} --lam-from {input.best} --seed {wildcards.seed}"
            " {params.state} --threads {threads} --no-progress --out {output} 2> {log}"

    rule train_baseline:
        input:
            cfg=RUN_CONFIG,
        output:
            BASELINE_RUN,
        log:
            "logs/runs/{arch}/baseline/{state}/seed{seed}.log",
        benchmark:
            "benchmarks/runs/{arch}/baseline/{state}/seed{seed}.tsv"
        conda:
            ENV
        threads: get_resources("train").get("threads", 1)
        resources:
            mem_mb=get_resources("train").get("mem_mb", 4000),
            runtime=get_resources("train").get("runtime", 120),
            gpu=get_resources("train").get("gpu", 0),
        params:
            state=lambda w: get_state_flags(w.state),
        shell:
            "ewcstab run --config {input.cfg} --arch {wildcards.arch} --lam 0 --seed {wildcards.seed}"
            " {params.state} --threads {threads} --no-progress --out {output} 2> {log}"

else:
    # `final.seeds_per_job` > 1: one job per group of seeds trains them as one batch and writes the
    # same per-seed records (plus their "batch" entry); one rule per group, so outputs stay per seed.
    for pack in get_final_packs():

        rule:
            name:
                f"train_final_seeds{pack[0]}_{pack[-1]}"
            input:
                cfg=RUN_CONFIG,
                best=get_lambda_file,
            output:
                [FINAL_RUN.replace("{seed}", str(s)) for s in pack],
            log:
                f"logs/runs/{{arch}}/{{method}}/{{variant}}/{{state}}/seeds{pack[0]}_{pack[-1]}.log",
            benchmark:
                f"benchmarks/runs/{{arch}}/{{method}}/{{variant}}/{{state}}/seeds{pack[0]}_{pack[-1]}.tsv"
            conda:
                ENV
            threads: get_resources("train").get("threads", 1)
            resources:
                mem_mb=get_resources("train").get("mem_mb", 4000),
                runtime=len(pack) * get_resources("train").get("runtime", 120),
                gpu=get_resources("train").get("gpu", 0),
            params:
                seeds=" ".join(str(s) for s in pack),
                runs=len(pack),
                state=lambda w: get_state_flags(w.state),
            shell:
                "ewcstab run-batched --config {input.cfg} --arch {wildcards.arch}"
                " --method {wildcards.method} --variant {wildcards.variant}"
                " --lam-from {input.best} --seeds {params.seeds} {params.state}"
                " --runs-per-batch {params.runs} --threads {threads} --no-progress --out {output} 2> {log}"

        rule:
            name:
                f"train_baseline_seeds{pack[0]}_{pack[-1]}"
            input:
                cfg=RUN_CONFIG,
            output:
                [BASELINE_RUN.replace("{seed}", str(s)) for s in pack],
            log:
                f"logs/runs/{{arch}}/baseline/{{state}}/seeds{pack[0]}_{pack[-1]}.log",
            benchmark:
                f"benchmarks/runs/{{arch}}/baseline/{{state}}/seeds{pack[0]}_{pack[-1]}.tsv"
            conda:
                ENV
            threads: get_resources("train").get("threads", 1)
            resources:
                mem_mb=get_resources("train").get("mem_mb", 4000),
                runtime=len(pack) * get_resources("train").get("runtime", 120),
                gpu=get_resources("train").get("gpu", 0),
            params:
                seeds=" ".join(str(s) for s in pack),
                runs=len(pack),
                state=lambda w: get_state_flags(w.state),
            shell:
                "ewcstab run-batched --config {input.cfg} --arch {wildcards.arch} --lam 0"
                " --seeds {params.seeds} {params.state} --runs-per-batch {params.runs}"
                " --threads {threads} --no-progress --out {output} 2> {log}"
