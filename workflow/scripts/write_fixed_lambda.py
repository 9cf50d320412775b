"""Write a lambda fixed in config as the JSON the final runs read (thin wrapper of ewcstab.lambdas)."""

import sys

from ewcstab.io import write_json_atomic
from ewcstab.lambdas import fixed_lambda_record

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects this object)
w = snakemake.wildcards  # noqa: F821
record = fixed_lambda_record(w.arch, w.method, w.variant, snakemake.params.lam)  # noqa: F821
write_json_atomic(snakemake.output[0], record)  # noqa: F821
