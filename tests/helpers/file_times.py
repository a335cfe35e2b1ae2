"""A pytest plugin for CI's log: where the session's time went, per test
file (the seconds of its tests' setup, call and teardown, and their share
of the session's wall time), the longest first.

    (tests/conftest.py loads it, so every run of the suite ends with it)

A module-scoped fixture's wait (a lab's results) counts in the file whose
first test waits for it."""

import collections
import time

STARTED = []
SECONDS = collections.Counter()


def pytest_sessionstart(session):
    STARTED.append(time.monotonic())


def pytest_runtest_logreport(report):
    SECONDS[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not SECONDS:
        return
    wall = time.monotonic() - STARTED[0]
    write = terminalreporter.write_line
    terminalreporter.section("time per test file")
    write(f"{'seconds':>8} {'share':>6}  file")
    for path, seconds in SECONDS.most_common():
        write(f"{seconds:8.1f} {100 * seconds / wall:5.1f}%  {path}")
    write(f"{sum(SECONDS.values()):8.1f}          all tests; session "
          f"{wall:.1f} s")
