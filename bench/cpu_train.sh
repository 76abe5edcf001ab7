#!/usr/bin/env bash
# CPU training benchmark: the default `fast` preset, the `quick` preset, and the tutorial network
# given quick's training time, each trained on the shared CIFAR-10 JPEG train set with its default
# epochs and scored on its test set. Prints one Markdown table. About 35 minutes on 2 cores.
# Each run starts with an empty dataset cache, so its wall time counts decoding the JPEGs too:
# from the command to the exported, evaluated model.
#
#   bash bench/cpu_train.sh [DATA_DIR] [OUT_DIR]
#   PRESETS="quick tutorial" picks presets; SEEDS="0 1 2" trains fast and quick once per seed
#   RESULTS=name writes bench/results/NAME.md and .json (default cpu_train_<presets>)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-jpeg}
OUT=${2:-runs/bench-cpu}
BIN=.venv/bin

run() {  # run PRESET DIR [extra args...]: train into $OUT/DIR, record the wall time
  local preset=$1 dir=$2; shift 2
  local start end
  local cache
  cache=$(mktemp -d)
  start=$(date +%s)
  CONVNET_CACHE_DIR=$cache "$BIN/convnet" train --data "$DATA" --out "$OUT/$dir" \
    --preset "$preset" "$@" >&2
  end=$(date +%s)
  rm -rf "$cache"
  local vdir="$OUT/$dir/$(ls "$OUT/$dir" | grep -E '^[0-9]+$' | sort -n | tail -1)"
  echo $((end - start)) > "$vdir/wall_seconds"
  echo "$vdir"
}

dirs=()
for preset in ${PRESETS:-fast quick tutorial}; do
  if [ "$preset" = tutorial ]; then
    # The tutorial's network gets the quick preset's training time (or 300 s) as its budget.
    budget=300
    if [ -n "${quick:-}" ]; then
      budget=$(python3 -c "import json;print(json.load(open('$quick/metrics.json'))['train_seconds'])")
    fi
    dirs+=("$(run tutorial tutorial --epochs 1000 --time-limit "$budget")")
  else
    for seed in ${SEEDS:-0}; do
      dir=$(run "$preset" "$preset-seed$seed" --seed "$seed")
      [ "$preset" = quick ] && [ -z "${quick:-}" ] && quick=$dir
      dirs+=("$dir")
    done
  fi
done
presets=${PRESETS:-fast quick tutorial}
"$BIN/python" bench/train_table.py --out "bench/results/${RESULTS:-cpu_train_${presets// /_}}" \
  --command "SEEDS=\"${SEEDS:-0}\" PRESETS=\"$presets\" bash bench/cpu_train.sh $*" "${dirs[@]}"
