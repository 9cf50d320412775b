# Section 4: pruning by weight importance. One job per trained network (all importances and
# scopes on it), then the curves of all networks, their mean with 95% bands, and the
# threshold table beside the paper's.


rule prune_by_importance:
    input:
        # the data stage verified MNIST under the same data root (data_root, else $EWCSTAB_DATA)
        data=DATA_MANIFEST.format(dataset="mnist"),
    output:
        curves=PRUNE_NET,
        meta=PRUNE_NET_META,
    log:
        "logs/pruning/{arch}/{importance_data}/net{seed}.log",
    benchmark:
        "benchmarks/pruning/{arch}/{importance_data}/net{seed}.tsv"
    conda:
        ENV
    threads: get_resources("train").get("threads", 1)
    resources:
        mem_mb=get_resources("train").get("mem_mb", 4000),
        runtime=get_resources("train").get("runtime", 120),
        gpu=get_resources("train").get("gpu", 0),
    params:
        flags=get_pruning_flags,
    shell:
        "ewcstab prune --arch {wildcards.arch} --seed {wildcards.seed}"
        " --importance-data {wildcards.importance_data} {params.flags} --threads {threads}"
        " --no-progress --out {output.curves} --meta-out {output.meta} 2> {log}"


rule summarize_pruning:
    input:
        nets=get_pruning_nets,
        paper=config.get("paper_pruning", []),
    output:
        curves=PRUNING_CURVES_TABLE,
        mean=PRUNING_MEAN_TABLE,
        thresholds=PRUNING_THRESHOLDS,
        md=PRUNING_THRESHOLDS_MD,
        tex=PRUNING_THRESHOLDS_TEX,
    log:
        "logs/pruning/summary.log",
    benchmark:
        "benchmarks/pruning/summary.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    params:
        paper=lambda wildcards, input: f"--paper {input.paper}" if input.paper else "",
    shell:
        "ewcstab prune-summary --inputs {input.nets} {params.paper} --all-out {output.curves}"
        " --curves-out {output.mean} --thresholds-out {output.thresholds}"
        " --thresholds-md {output.md} --thresholds-tex {output.tex} 2> {log}"
