# Accuracy against lambda on a fixed grid (`continual.sweeps`), in every optimizer state: one job per
# (sweep, state, lambda) trains that lambda's seeds as one batch (a carried chain within the job).


for sweep in get_sweeps():

    rule:
        name:
            f"train_sweep_{sweep['arch']}_{sweep['method']}_{sweep['variant']}"
        input:
            cfg=RUN_CONFIG.replace("{arch}", sweep["arch"]),
        output:
            [
                SWEEP_RUN.replace("{arch}", sweep["arch"])
                .replace("{method}", sweep["method"])
                .replace("{variant}", sweep["variant"])
                .replace("{seed}", str(s))
                for s in range(sweep["seeds"])
            ],
        log:
            f"logs/sweeps/{sweep['arch']}/{sweep['method']}/{sweep['variant']}/{{state}}/lam{{lam}}.log",
        benchmark:
            f"benchmarks/sweeps/{sweep['arch']}/{sweep['method']}/{sweep['variant']}/{{state}}/lam{{lam}}.tsv"
        conda:
            ENV
        threads: get_resources("train").get("threads", 1)
        resources:
            mem_mb=get_resources("train").get("mem_mb", 4000),
            runtime=sweep["seeds"] * get_resources("train").get("runtime", 120),
            gpu=get_resources("train").get("gpu", 0),
        params:
            study=f"--arch {sweep['arch']} --method {sweep['method']} --variant {sweep['variant']}",
            seeds=" ".join(str(s) for s in range(sweep["seeds"])),
            state=lambda w: get_state_flags(w.state),
        shell:
            "ewcstab run-batched --config {input.cfg} {params.study} --lam {wildcards.lam}"
            " --seeds {params.seeds} {params.state} --threads {threads} --no-progress"
            " --out {output} 2> {log}"


rule gather_sweeps:
    input:
        get_sweep_records,
    output:
        SWEEP_TABLE,
    log:
        "logs/aggregate/gather_sweeps.log",
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    shell:
        "ewcstab gather --sweep {input} --out {output} 2> {log}"
