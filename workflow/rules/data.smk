# The data stage: each dataset is located (or downloaded, when `download: true`) once, every raw file is
# checked and identified by sha256 (ewcstab.data.prepare_dataset, src/ewcstab/data_sha256.txt), and a
# manifest is written. Training jobs depend on the manifests through their run settings, which say
# `download: false` and name the verified data root: they never download.


rule fetch_dataset:
    output:
        DATA_MANIFEST,
    log:
        "logs/data/{dataset}.log",
    benchmark:
        "benchmarks/data/{dataset}.tsv"
    # on the submitting machine: a cluster's compute nodes often have no internet
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    params:
        root=config["data_root"],
        download=config["download"],
    script:
        "../scripts/fetch_dataset.py"


# The run settings every job of an architecture shares, validated by ewcstab.config.RunConfig.
rule write_run_config:
    input:
        data=get_run_datasets,
    output:
        RUN_CONFIG,
    log:
        "logs/configs/{arch}.log",
    benchmark:
        "benchmarks/configs/{arch}.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        settings=get_run_settings,
    script:
        "../scripts/write_run_config.py"
