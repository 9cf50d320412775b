# The run settings every job of an architecture shares, validated by ewcstab.config.RunConfig.


rule write_run_config:
    output:
        RUN_CONFIG,
    log:
        "logs/configs/{arch}.log",
    benchmark:
        "benchmarks/configs/{arch}.tsv"
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
