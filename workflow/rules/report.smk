# Pages of `snakemake --report` besides the figures: every table as HTML, the configuration
# used, and the provenance of the run records (versions, commit, data checksums).


rule summarize_provenance:
    input:
        get_provenance_records,
    output:
        csv=PROVENANCE[0],
        json=PROVENANCE[1],
    log:
        "logs/report/summarize_provenance.log",
    benchmark:
        "benchmarks/report/summarize_provenance.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    script:
        "../scripts/summarize_provenance.py"


rule render_report_table:
    input:
        TABLE_CSV,
    output:
        report(
            REPORT_TABLE,
            caption="../report/table.rst",
            category=get_table_category,
            subcategory=get_table_subcategory,
            labels={"table": "{table}"},
        ),
    log:
        "logs/report/{table}.log",
    benchmark:
        "benchmarks/report/{table}.tsv"
    wildcard_constraints:
        table="[a-z0-9_]+",
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=get_resources("aggregate").get("mem_mb", 2000),
        runtime=get_resources("aggregate").get("runtime", 10),
    script:
        "../scripts/render_table.py"


rule write_report_config:
    output:
        report(
            REPORT_CONFIG,
            caption="../report/configuration.rst",
            category="Configuration and provenance",
            subcategory="configuration",
            labels={"page": "configuration"},
        ),
    log:
        "logs/report/configuration.log",
    benchmark:
        "benchmarks/report/configuration.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        config=config,
        configfiles=get_configfiles(),
    script:
        "../scripts/write_report_config.py"
