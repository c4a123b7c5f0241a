#!/usr/bin/env bash
# Runs the three Jobs in order on the current kubectl context: stats, the indexed shards, assemble,
# each after the previous one completed. The claim smoe-data must hold model.h5 and model.calib.h5.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
timeout=${SMOE_TIMEOUT:-24h}
for job in stats shards assemble; do
  kubectl apply -f "$here/$job-job.yaml"
  kubectl wait --for=condition=complete "job/smoe-$job" --timeout="$timeout"
done
