# The run settings every job of an architecture shares, validated by ewcstab.config.RunConfig.


rule write_run_config:
    output:
        RUN_CONFIG,
    params:
        settings=get_run_settings,
    log:
        "logs/configs/{arch}.log",
    benchmark:
        "benchmarks/configs/{arch}.tsv"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        ENV
    script:
        "../scripts/write_run_config.py"
