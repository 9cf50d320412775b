"""A results table as a self-contained HTML page for the report (thin wrapper of ewcstab.figures.report)."""

import sys

from ewcstab.figures.report import render_table
from ewcstab.io import write_text_atomic

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects this object)
write_text_atomic(snakemake.output[0], render_table(snakemake.input[0], snakemake.wildcards.table))  # noqa: F821
