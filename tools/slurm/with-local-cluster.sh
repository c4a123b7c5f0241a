#!/usr/bin/env bash
# Runs COMMAND… with a single-node Slurm up (tools/slurm/local-cluster.sh, in a fresh temporary
# folder, SLURM_CONF exported), then stops the daemons by their PIDs and removes the folder.
# COMMAND's exit status is returned. If the daemons cannot start, COMMAND still runs, and the
# Slurm test skips, printing why.
set -u
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d /tmp/smoe-slurm.XXXXXX)
cleanup() { "$here/local-cluster.sh" stop "$dir"; rm -rf "$dir"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
"$here/local-cluster.sh" start "$dir" >/dev/null
SLURM_CONF="$dir/slurm.conf" "$@"
