#!/usr/bin/env bash
# Snakemake runs this once after creating the conda env, from the workflow's working directory
# (the repository root): install the project's own package into the env.
set -euo pipefail
python -m pip install --no-deps -e .
