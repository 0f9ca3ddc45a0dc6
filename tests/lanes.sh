#!/usr/bin/env bash
# `make test`: the suite as two pytest processes at once. Lane B runs the test paths given as arguments, lane A
# everything else; lane A's output streams, lane B's is printed after it. Each lane keeps its own temporary
# folder and junit file; the last line ("total: N passed, N failed") counts both lanes, and the exit status
# is non-zero if either lane failed.
set -uo pipefail
PY=${PY:-python}
out=$(mktemp -d /tmp/segnet-lanes-XXXXXX)
ignore=()
for path in "$@"; do ignore+=(--ignore "$path"); done
"$PY" -m pytest -q --basetemp "$out/b" --junitxml "$out/b.xml" "$@" >"$out/b.log" 2>&1 &
lane_b=$!
"$PY" -m pytest -q --basetemp "$out/a" --junitxml "$out/a.xml" "${ignore[@]}"
status_a=$?
wait "$lane_b"
status_b=$?
echo "=== lane B: $* (exit $status_b; its temporary folders are in $out) ==="
cat "$out/b.log"
"$PY" - "$out/a.xml" "$out/b.xml" <<'PYEND'
import sys
import xml.etree.ElementTree as ET

counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for path in sys.argv[1:]:
    try:
        suite = ET.parse(path).getroot().find("testsuite")
    except (OSError, ET.ParseError):
        print(f"lanes: no junit file {path}: that lane did not finish")
        continue
    for key in counts:
        counts[key] += int(suite.get(key, 0))
failed = counts["failures"] + counts["errors"]
passed = counts["tests"] - failed - counts["skipped"]
print(f"total: {passed} passed, {failed} failed, {counts['skipped']} skipped")
PYEND
[[ $status_a == 0 && $status_b == 0 ]]
