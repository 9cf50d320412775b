#!/usr/bin/env bash
# Snakemake runs this once after creating the conda env, with the env active, in Snakemake's working
# directory, which need not be this repository (--directory, a --conda-prefix shared by several working
# directories). workflow/rules/common.smk exports the workflow's own folder (workflow.basedir) as
# EWCSTAB_WORKFLOW_DIR; the package is installed from there, editable, without its dependencies (the env
# has them).
set -euo pipefail
: "${EWCSTAB_WORKFLOW_DIR:?not set: create the environment through the Snakefile of this workflow}"
python -m pip install --no-deps -e "$EWCSTAB_WORKFLOW_DIR"
