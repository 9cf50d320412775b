"""Validate the shared run settings with RunConfig and write them as YAML (thin wrapper). The data root is the
one the data stage verified (its manifests, input `data`) and runs never download."""

import sys

import yaml

from ewcstab.config import RunConfig
from ewcstab.io import read_json, write_text_atomic

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects this object)
settings = dict(snakemake.params.settings)  # noqa: F821
(settings["data_root"],) = {read_json(m)["root"] for m in snakemake.input.data}  # noqa: F821
settings["download"] = False
RunConfig.from_dict(settings)  # fails with the field name and the allowed values
write_text_atomic(snakemake.output[0], yaml.safe_dump(settings, sort_keys=True))  # noqa: F821
