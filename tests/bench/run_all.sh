#!/bin/sh
# Run all of kvmexit's benchmarks, as root, from anywhere:
#
#   tests/bench/run_all.sh
#
# Each prints a table and a target line (met / MISSED); the exit status is
# non-zero if any target was missed or a check failed.  About 4 minutes.
set -u
cd "$(dirname "$0")/../.." || exit 1
PYTHON=${PYTHON:-/usr/bin/python3}     # the Python bcc imports under
rc=0
for bench in report_time memory event_cost filter_cost detail_cost; do
    echo "== tests/bench/$bench.py"
    "$PYTHON" "tests/bench/$bench.py" || rc=1
    echo
done
exit $rc
