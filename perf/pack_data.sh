#!/usr/bin/env bash
# Pack the raw MNIST and Fashion-MNIST files, gzipped, into .gpu_data/ for a device check (perf/gpu_check.sh):
# the device machine reaches no network and receives only the working tree. .gpu_data/ is kept out of git
# (.git/info/exclude) and named in the device call's `carry`.
#   EWCSTAB_DATA=/path/to/torchvision-root bash perf/pack_data.sh
set -euo pipefail
root=${EWCSTAB_DATA:?set EWCSTAB_DATA to the torchvision data root}
cd "$(dirname "$0")/.."
grep -qx '/.gpu_data/' .git/info/exclude 2>/dev/null || echo '/.gpu_data/' >> .git/info/exclude
for dataset in MNIST FashionMNIST; do
  mkdir -p ".gpu_data/$dataset/raw"
  for f in "$root/$dataset/raw/"*-ubyte; do gzip -c "$f" > ".gpu_data/$dataset/raw/$(basename "$f").gz"; done
done
du -sh .gpu_data
