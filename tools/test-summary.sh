#!/usr/bin/env bash
# Prints, at the end of `make test`, every test that was skipped and why, from the logs the
# Swift and Python runs wrote, so a CI log shows at once whether the interop and SciPy
# comparisons really ran. Usage: tools/test-summary.sh LOG...
set -u
lines=$(for log in "$@"; do
  [ -f "$log" ] || continue
  # XCTest: "/path/File.swift:72: Suite.testName : Test skipped: required false value but got true - reason"
  # (`throw XCTSkip("reason")` prints "Test skipped - reason")
  sed -n 's/^.*: \([A-Za-z0-9_]*\.test[A-Za-z0-9_]*\) : Test skipped\(:\| -\) \(required [a-z]* value but got [a-z]* - \)\{0,1\}\(.*\)$/  swift   \1: \4/p' "$log"
  # pytest -rs: "SKIPPED [1] tools/test_x.py:61: reason"
  sed -n "s/^SKIPPED \[[0-9]*\] \(.*\)$/  python  \1/p" "$log"
done)
if [ -z "$lines" ]; then
  echo "== skipped: none"
else
  echo "== skipped: $(printf '%s\n' "$lines" | wc -l)"
  printf '%s\n' "$lines"
fi
