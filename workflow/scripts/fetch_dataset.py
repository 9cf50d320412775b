"""The data stage for one dataset: locate or download it, check every file, identify it by sha256, write the
manifest (thin wrapper of ewcstab.data.prepare_dataset). A problem is one line naming the file or folder."""

import sys

from ewcstab.data import prepare_dataset, resolve_data_root
from ewcstab.errors import UserError
from ewcstab.io import write_json_atomic

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects this object)
dataset, params = snakemake.wildcards.dataset, snakemake.params  # noqa: F821
try:
    manifest = prepare_dataset(dataset, resolve_data_root(params.root), params.download)
except UserError as err:
    for stream in (sys.stderr, sys.__stderr__):  # the log, and the terminal running Snakemake
        print(f"ewcstab: {err}", file=stream, flush=True)
    sys.exit(1)
print(f"{dataset}: {manifest['source']} ({manifest['source_note']}) under {manifest['root']}", file=sys.stderr)
write_json_atomic(snakemake.output[0], manifest)  # noqa: F821
