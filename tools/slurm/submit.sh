#!/usr/bin/env bash
# Submits a layer-sharded `compress` of MODEL to Slurm as three chained jobs:
#   1. stats     routing statistics of every layer (the global decisions: --adaptive budgets)
#   2. shards    a job array, one task per shard (--shard I/N), each writing OUT/shards/shard.I.h5
#   3. assemble  the shards and MODEL into OUT/compressed.h5
# each starting only when the previous one succeeded (--dependency=afterok).
#
# Usage: tools/slurm/submit.sh MODEL CALIB OUT SHARDS [compress options…]
#   e.g. tools/slurm/submit.sh mixtral.h5 mixtral.calib.h5 /shared/run1 8 --groups 4 --adaptive --rank 256
# Environment: SMOE (the smoe-compress binary, default: smoe-compress on PATH), SMOE_CPUS (CPUs
# per shard task, default 4), SMOE_MEM (memory per shard task, default from the model: see
# README "On a cluster"), SMOE_SBATCH (extra sbatch options, e.g. "--partition=cpu --time=4:00:00").
# OUT must be on a file system every node sees. Prints the three job ids.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 MODEL CALIB OUT SHARDS [compress options…]" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
model=$(realpath "$1"); calib=$(realpath "$2"); out=$3; shards=$4; shift 4
smoe=${SMOE:-smoe-compress}
cpus=${SMOE_CPUS:-4}
mkdir -p "$out/shards" "$out/logs"
out=$(realpath "$out")

# The run's settings, one argument per line (read back by the job scripts; spaces survive).
: > "$out/compress.args"
for a in "$@"; do printf '%s\n' "$a" >> "$out/compress.args"; done

# Memory per shard task: about 3× the largest layer's experts in float32 (the original, the
# merged or factored copy, and work space) plus 512 MiB; override with SMOE_MEM.
if [ -z "${SMOE_MEM:-}" ]; then
  params=$("$smoe" plan "$model" --shards "$shards" --json | sed -n 's/.*"max_layer_parameters": *\([0-9]*\).*/\1/p')
  SMOE_MEM="$(( params * 4 * 3 / 1048576 + 512 ))M"
fi

export SMOE="$smoe" SMOE_MODEL="$model" SMOE_CALIB="$calib" SMOE_OUT="$out" SMOE_SHARDS="$shards"
# shellcheck disable=SC2086
common=(--parsable --export=ALL ${SMOE_SBATCH:-})
stats=$(sbatch "${common[@]}" --job-name=smoe-stats --cpus-per-task="$cpus" --mem="$SMOE_MEM" \
  --output="$out/logs/stats.%j.out" "$here/stats.sbatch")
array=$(sbatch "${common[@]}" --job-name=smoe-shard --array="0-$((shards - 1))" --cpus-per-task="$cpus" \
  --mem="$SMOE_MEM" --dependency="afterok:${stats%%;*}" --output="$out/logs/shard.%A_%a.out" "$here/shard.sbatch")
assemble=$(sbatch "${common[@]}" --job-name=smoe-assemble --cpus-per-task=1 --mem="$SMOE_MEM" \
  --dependency="afterok:${array%%;*}" --output="$out/logs/assemble.%j.out" "$here/assemble.sbatch")
echo "stats ${stats%%;*} shards ${array%%;*} assemble ${assemble%%;*}"
