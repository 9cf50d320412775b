"""Accuracy after the last task against lambda, one arch (thin wrapper of ewcstab.figures)."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects this object)

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import pandas as pd  # noqa: E402

from ewcstab import figures  # noqa: E402

figures.set_style()
fig = figures.plot_lambda_search(
    figures.read_trials(snakemake.input.trials),  # noqa: F821
    runs=pd.read_csv(snakemake.input.runs),  # noqa: F821
    table1=pd.read_csv(snakemake.input.table1),  # noqa: F821
    arch=snakemake.wildcards.arch,  # noqa: F821
)
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)  # noqa: F821
