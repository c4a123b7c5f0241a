#!/usr/bin/env bash
# Runs the built XCTest bundle (swift build --build-tests) one test class at a time from a shared
# queue, by one worker at first and by a second one once GATE exists (make test touches it when
# the Python tests are done, so both cores stay busy; an existing GATE starts both at once).
# Prints a line per finished class while it runs, then every class's XCTest output in class
# order (also written to LOGDIR/swift.log, which tools/test-summary.sh reads) and a closing
# "swift: N passed, N failed, N skipped" line. Exits non-zero when a class failed or crashed.
# Usage: tools/swift-tests.sh LOGDIR GATE   (SWIFT_TEST_CLASSES=REGEX: only the classes it matches)
set -u
# One OpenBLAS thread per test process: two processes already share the two cores (two workers,
# or one beside the Python tests), and OpenBLAS threads that find no free core spin in
# sched_yield. Measured on the Intel Xeon family 6 model 207 (2 vCPU): the debug suite with two
# workers took 798 worker-seconds (414 s wall) with one thread each, against about 1,100 with
# OpenBLAS's default; one --target-size run in ReportTests spent 26 of its 43 s in the kernel
# yielding. An OPENBLAS_NUM_THREADS already set is kept.
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
logdir=$1 gate=$2
bin=$(swift build --show-bin-path)/smoe-compressPackageTests.xctest
work=$logdir/swift-classes
rm -rf "$work"; mkdir -p "$work"
"$bin" --list-tests | sed -n 's|^\([A-Za-z0-9_]*\.[A-Za-z0-9_]*\)/test.*$|\1|p' | sort -u \
  | grep -E "${SWIFT_TEST_CLASSES:-.}" > "$work/queue"
total=$(wc -l < "$work/queue")
[ "$total" -gt 0 ] || { echo "error: $bin lists no test class" >&2; exit 1; }
echo "== swift tests: $total classes from $bin, one class at a time, two workers once $gate exists"
: > "$work/taken"

worker() {
  local n class out status start
  while true; do
    # The next class not yet taken (flock: the two workers never take the same one).
    class=$(flock "$work/taken" bash -c 'n=$(wc -l < "$1"); c=$(sed -n "$((n + 1))p" "$2"); [ -n "$c" ] && echo "$c" >> "$1"; echo "$c"' _ "$work/taken" "$work/queue")
    [ -n "$class" ] || return 0
    n=$(grep -n -x -F "$class" "$work/queue" | cut -d: -f1)
    out=$(printf '%s/%03d-%s.log' "$work" "$n" "$class")
    start=$(date +%s)
    "$bin" "$class" > "$out" 2>&1
    status=$?
    echo "$status" > "$out.status"
    if [ "$status" = 0 ]; then word=passed; else word="FAILED (exit $status)"; fi
    echo "[swift $n/$total, worker $1] $class $word in $(( $(date +%s) - start )) s"
  done
}

worker 1 &
w1=$!
while [ ! -e "$gate" ] && [ "$(wc -l < "$work/taken")" -lt "$total" ]; do sleep 2; done
worker 2
wait "$w1"

cat "$work"/[0-9]*.log > "$logdir/swift.log"
cat "$logdir/swift.log"
passed=$(grep -c "^Test Case '.*' passed (" "$logdir/swift.log")
failed=$(grep -c "^Test Case '.*' failed (" "$logdir/swift.log")
skipped=$(grep -c "^Test Case '.*' skipped (" "$logdir/swift.log")
bad=$(grep -L -x 0 "$work"/*.status | sed 's|.*/[0-9]*-\(.*\)\.log\.status$|\1|')
echo "swift: $passed passed, $failed failed, $skipped skipped"
if [ -n "$bad" ]; then
  echo "== swift test classes that failed or crashed: $(echo $bad)"
  exit 1
fi
