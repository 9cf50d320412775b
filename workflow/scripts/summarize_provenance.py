"""Provenance of every run record -> tidy CSV and JSON summary (thin wrapper of ewcstab.figures.report)."""

import sys

from ewcstab.figures.report import provenance_summary, provenance_table, read_provenance
from ewcstab.io import write_json_atomic, write_text_atomic

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects this object)
provenance = read_provenance(snakemake.input)  # noqa: F821
write_text_atomic(snakemake.output.csv, provenance_table(provenance).to_csv(index=False))  # noqa: F821
write_json_atomic(snakemake.output.json, provenance_summary(provenance))  # noqa: F821
