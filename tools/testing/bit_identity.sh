#!/bin/bash
# Bit-identity check of a restructuring (issue 26): runs every writing and reading command with
# --json on both trained fixtures with binary A and binary B and compares the outputs: HDF5 files
# with h5diff (the history entries' run times aside: see below), export folders byte for byte,
# JSON documents with their timing fields removed.
#   tools/testing/bit_identity.sh OLD_BIN NEW_BIN [WORKDIR]
set -u
A=$1; B=$2; W=${3:-/tmp/bit-identity}
rm -rf "$W"; mkdir -p "$W"
FX=$(cd "$(dirname "$0")/../.." && pwd)/Fixtures
fail=0
# Removes wall-clock figures: the timing arrays, *_seconds and peak memory keys, and paths (a vs b).
strip() { jq -S 'walk(if type == "object" then with_entries(select(.key | test("timing|seconds|peak|rss|time") | not)) else . end)' "$1"; }
# Both binaries run every command in the same folder ($W/run, renamed to $W/a and $W/b after), so
# the paths recorded in the files are the same.
run() { # name, command line with OUT for the output folder
  local name=$1; shift
  [ "$PHASE" = compare ] && { cmpout "$name"; return; }
  local args=("${@//OUT/$W/run}")
  "$BIN" "${args[@]}" --quiet --json > "$W/run/$name.json" 2> "$W/run/$name.err"; echo $? > "$W/run/$name.rc"
}
cmpout() {
  local name=$1
  if ! cmp -s "$W/a/$name.rc" "$W/b/$name.rc"; then echo "DIFF exit code: $name"; fail=1; fi
  if ! cmp -s <(strip "$W/a/$name.json") <(strip "$W/b/$name.json"); then echo "DIFF json: $name"; fail=1; fi
  if ! cmp -s "$W/a/$name.err" "$W/b/$name.err"; then echo "DIFF stderr: $name"; fail=1; fi
}
h5cmp() { # an HDF5 output of both binaries
  [ "$PHASE" = compare ] || return 0
  local f=$1
  if [ ! -e "$W/a/$f" ]; then echo "MISSING a/$f"; fail=1; return; fi
  if ! h5diff -q "$W/a/$f" "$W/b/$f" >/dev/null 2>&1; then
    echo "DIFF h5: $f"; h5diff -r "$W/a/$f" "$W/b/$f" 2>&1 | head -5; fail=1
  else echo "same: $f"; fi
}
commands() {
for m in mixtral switch; do
  M=$FX/trained-$m.h5; C=$FX/trained-$m.calib.h5; H=$FX/trained-$m.heldout.h5
  run $m-stats stats "$M" --calib "$C" --similarity all -o OUT/$m.stats.h5; h5cmp $m.stats.h5
  run $m-stats-shard stats "$M" --calib "$C" --shard 1/2 -o OUT/$m.stats.s1.h5; h5cmp $m.stats.s1.h5
  run $m-align align "$M" --stats OUT/$m.stats.h5 -o OUT/$m.align.h5; h5cmp $m.align.h5
  run $m-align-shard align "$M" --shard 0/2 -o OUT/$m.align.s0.h5; h5cmp $m.align.s0.h5
  run $m-merge merge "$M" --calib "$C" --groups 2 -o OUT/$m.merge.h5; h5cmp $m.merge.h5
  run $m-merge-stats merge "$M" --stats OUT/$m.stats.h5 --merge-method frequency --groups 3 -o OUT/$m.mergef.h5; h5cmp $m.mergef.h5
  run $m-lowrank lowrank "$M" --calib "$C" --rank 4 --sparsity 0.01 -o OUT/$m.lowrank.h5; h5cmp $m.lowrank.h5
  run $m-lowrank-w lowrank "$M" --energy 0.9 --shard 1/2 -o OUT/$m.lowrank.s1.h5; h5cmp $m.lowrank.s1.h5
  run $m-compress compress "$M" --calib "$C" --eval-calib "$H" --groups 2 --rank 4 -o OUT/$m.compress.h5; h5cmp $m.compress.h5
  run $m-compact merge "$M" --calib "$C" --groups 2 --router compact -o OUT/$m.compact.h5; h5cmp $m.compact.h5
  run $m-prune merge "$M" --calib "$C" --groups 2 --prune reap -o OUT/$m.prune.h5; h5cmp $m.prune.h5
  run $m-expand expand OUT/$m.compress.h5 -o OUT/$m.expand.h5; h5cmp $m.expand.h5
  run $m-expand-slot expand OUT/$m.merge.h5 --per-slot --shard 0/2 -o OUT/$m.expand.s0.h5; h5cmp $m.expand.s0.h5
  run $m-eval eval "$M" OUT/$m.compress.h5 --calib "$H"
  run $m-eval-lr eval "$M" OUT/$m.lowrank.h5 --calib "$H" --max-tokens 100
  run $m-eval-bad eval "$M" OUT/$m.stats.h5 --calib "$H"
  run $m-export export OUT/$m.compress.h5 -o OUT/$m.hf
  run $m-export-c export OUT/$m.compact.h5 -o OUT/$m.hfc
  [ "$PHASE" = compare ] && for d in $m.hf $m.hfc; do
    if diff -r "$W/a/$d" "$W/b/$d" >/dev/null; then echo "same: $d/"; else echo "DIFF folder: $d"; fail=1; fi
  done
  run $m-import import OUT/$m.hf -o OUT/$m.reimport.h5; h5cmp $m.reimport.h5
  run $m-import-c import OUT/$m.hfc -o OUT/$m.reimportc.h5; h5cmp $m.reimportc.h5
done
}
for pair in "a $A" "b $B"; do
  set -- $pair; PHASE=run; BIN=$2; mkdir -p "$W/run"; commands; mv "$W/run" "$W/$1"
done
PHASE=compare; commands
for f in "$W"/a/*.rc; do n=$(basename "$f" .rc); [ "$(cat "$f")" = 0 ] || echo "note: $n exits $(cat "$f") (both binaries: $(cat "$W/b/$n.rc"))"; done
[ $fail = 0 ] && echo "ALL IDENTICAL" || echo "DIFFERENCES FOUND"
exit $fail
