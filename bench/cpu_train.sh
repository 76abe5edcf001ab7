#!/usr/bin/env bash
# CPU training benchmark: the default `fast` preset, the `quick` preset, and the tutorial network
# given the same wall-time budget as `fast`, each trained on the shared CIFAR-10 JPEG train set and
# scored on its test set. Prints one Markdown table. Takes about an hour on 2 cores.
#
#   bash bench/cpu_train.sh [DATA_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-jpeg}
OUT=${2:-runs/bench-cpu}
BIN=.venv/bin

run() {  # run PRESET [extra args...]: train into $OUT/PRESET, record the wall time
  local preset=$1; shift
  local start end
  start=$(date +%s)
  "$BIN/convnet" train --data "$DATA" --out "$OUT/$preset" --preset "$preset" "$@" >&2
  end=$(date +%s)
  local vdir="$OUT/$preset/$(ls "$OUT/$preset" | grep -E '^[0-9]+$' | sort -n | tail -1)"
  echo $((end - start)) > "$vdir/wall_seconds"
  echo "$vdir"
}

# Decode once so every timed run starts from the dataset cache, as a second run would.
"$BIN/python" -c "from convnet.data import load_dataset; load_dataset('$DATA')"
fast=$(run fast)
quick=$(run quick)
budget=$(python3 -c "import json;print(json.load(open('$fast/metrics.json'))['train_seconds'])")
tutorial=$(run tutorial --epochs 1000 --time-limit "$budget")
"$BIN/python" bench/train_table.py "$fast" "$quick" "$tutorial"
