"""Gradient-explosion study: accuracy after the last task against lambda (thin wrapper of ewcstab.figures)."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects this object)

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import pandas as pd  # noqa: E402

from ewcstab import figures  # noqa: E402
from ewcstab.figures.explosion import plot_explosion_accuracy  # noqa: E402

figures.set_style()
fig = plot_explosion_accuracy(pd.read_csv(snakemake.input.runs))  # noqa: F821
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)  # noqa: F821
