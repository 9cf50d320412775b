"""Test accuracy against the fraction pruned, one scope (thin wrapper of ewcstab.figures)."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects this object)

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import pandas as pd  # noqa: E402

from ewcstab import figures  # noqa: E402

figures.set_style()
paper = pd.read_csv(snakemake.input.paper) if snakemake.input.get("paper") else None  # noqa: F821
fig = figures.plot_pruning_curves(
    pd.read_csv(snakemake.input.curves),  # noqa: F821
    snakemake.wildcards.scope,  # noqa: F821
    paper=paper,
)
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)  # noqa: F821
