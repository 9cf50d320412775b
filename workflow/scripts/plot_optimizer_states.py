"""Carried against fresh optimizer state per setting, beside the paper, one arch (thin wrapper of ewcstab.figures)."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects this object)

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import pandas as pd  # noqa: E402

from ewcstab import figures  # noqa: E402

figures.set_style()
fig = figures.plot_state_comparison(
    pd.read_csv(snakemake.input.states),  # noqa: F821
    paper=pd.read_csv(snakemake.input.paper),  # noqa: F821
    arch=snakemake.wildcards.arch,  # noqa: F821
)
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)  # noqa: F821
