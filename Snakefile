# Reproduction of Kutalev & Lapina (arXiv:2109.10021). Reads and validates the config,
# includes one rule file per stage, and names the default target. Logic lives in
# workflow/rules/common.smk; the science lives in the ewcstab package (src/).
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/final.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/pruning.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/explosion.smk"


rule all:
    default_target: True
    input:
        get_all_targets(),
        get_report_targets(),
        get_pruning_targets(),
        get_explosion_targets(),
