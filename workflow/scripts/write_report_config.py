"""The merged configuration as an HTML page for the report (thin wrapper of ewcstab.figures.report)."""

import sys

from ewcstab.figures.report import config_page
from ewcstab.io import write_text_atomic

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects this object)
page = config_page(snakemake.params.config, snakemake.params.configfiles)  # noqa: F821
write_text_atomic(snakemake.output[0], page)  # noqa: F821
