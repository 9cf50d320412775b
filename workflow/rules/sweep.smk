# Accuracy against lambda on a fixed grid (`continual.sweeps`), in every optimizer state: one job per
# (sweep, group of `lambdas_per_job` lambdas, state) trains every seed of its lambdas stacked (carried: the
# chains of those lambdas advance side by side). Finished groups are kept when a sweep is interrupted.


for sweep in get_sweeps():
    for group in sweep_groups(sweep):
        study_dir = f"{sweep['arch']}/{sweep['method']}/{sweep['variant']}"
        lams = [lam_label(lam) for lam in group]
        part = lams[0] if len(lams) == 1 else f"{lams[0]}-{lams[-1]}"

        rule:
            name:
                f"train_sweep_{sweep['arch']}_{sweep['method']}_{sweep['variant']}_lam{part.replace('.', 'p').replace('-', '_')}"
            input:
                cfg=RUN_CONFIG.replace("{arch}", sweep["arch"]),
            output:
                [
                    SWEEP_RUN.replace("{arch}", sweep["arch"])
                    .replace("{method}", sweep["method"])
                    .replace("{variant}", sweep["variant"])
                    .replace("{lam}", lam)
                    .replace("{seed}", str(s))
                    for s in range(sweep["seeds"])
                    for lam in lams
                ],
            log:
                f"logs/sweeps/{study_dir}/{{state}}/lam{part}.log",
            benchmark:
                f"benchmarks/sweeps/{study_dir}/{{state}}/lam{part}.tsv"
            conda:
                ENV
            threads: get_resources("train").get("threads", 1)
            resources:
                mem_mb=get_resources("train").get("mem_mb", 4000),
                runtime=sweep["seeds"]
                * len(lams)
                * get_resources("train").get("runtime", 120),
                gpu=get_resources("train").get("gpu", 0),
            params:
                study=f"--arch {sweep['arch']} --method {sweep['method']} --variant {sweep['variant']}",
                seeds=" ".join(str(s) for s in range(sweep["seeds"])),
                lams=" ".join(lams),
                runs=sweep.get("runs_per_batch", 10),
                state=lambda w: get_state_flags(w.state),
            shell:
                "ewcstab run-batched --config {input.cfg} {params.study} --lams {params.lams}"
                " --seeds {params.seeds} {params.state} --runs-per-batch {params.runs}"
                " --threads {threads} --no-progress"
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
