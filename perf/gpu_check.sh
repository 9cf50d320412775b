#!/usr/bin/env bash
# The device check of the training engine, as one prepared command (docs/performance.md):
#   1. the CUDA tests (CUDA graphs replay the eager steps, for the MLP and the CNN);
#   2. the engine benchmark on CUDA: one run at a time against R stacked, MLP and CNN, against the matmul
#      floor measured in the same invocation (JSON to $OUT; draw the figure afterwards on any machine with
#      `python -c 'import json,sys; ...'`, see docs/performance.md).
# Runs with the device machine's own torch (no install): PYTHONPATH=src. Data: .gpu_data/ from
# perf/pack_data.sh, carried. DEVICE=cpu and small STEPS try the script on a CPU first.
#   bash perf/gpu_check.sh                       # on the device, with carry [".gpu_data"]
#   DEVICE=cpu STEPS=3 MLP_RUNS="1 2" CNN_RUNS="1 2" OUT=/tmp/check bash perf/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-}
MLP_RUNS=${MLP_RUNS:-1 20 100}
CNN_RUNS=${CNN_RUNS:-1 5 20}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
data=$(mktemp -d)
for f in .gpu_data/*/raw/*.gz; do
  dest="$data/${f#.gpu_data/}"; mkdir -p "$(dirname "$dest")"; gunzip -c "$f" > "${dest%.gz}"
done
export EWCSTAB_DATA=$data
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine.py 2>&1 | tee "$OUT/gpu_tests.log"
steps=()
[ -n "$STEPS" ] && steps=(--mlp-steps "$STEPS" --cnn-steps "$STEPS")
python3 perf/benchmark_engine.py --device "$DEVICE" --archs mlp cnn --mlp-runs $MLP_RUNS --cnn-runs $CNN_RUNS \
  "${steps[@]}" --json "$OUT/throughput_$DEVICE.json" 2>&1 | grep -v " INFO " | tee "$OUT/benchmark.log"
