"""The lab tests' session: every lab boots once for all the scenarios
the collected tests need (fixtures.py).  All of them start in the
background as soon as the tests are collected; the tests that read their
results run last, those of the lab that should end first first, so that
the host tests and the other lab tests run while the labs boot and work.
The session ends with a line per lab (its time and its scenarios') and
one counting the labs' boots, the boots retried and the labs frozen."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixtures  # noqa: E402

RUNS = []


def scenario_lab(item):
    scenario = getattr(getattr(item, "module", None), "SCENARIO", None)
    return scenario.lab if isinstance(scenario, fixtures.Scenario) else None


def pytest_collection_modifyitems(session, config, items):
    """Tests without a lab scenario first, in their order; then those of
    each lab, the labs in the reverse of fixtures.LABS (the shortest
    first).  A stable sort keeps each module's tests together."""
    def rank(item):
        kind = scenario_lab(item)
        if kind is None:
            return 0
        known = fixtures.LABS.index(kind) if kind in fixtures.LABS else -1
        return 1 + len(fixtures.LABS) - known
    items.sort(key=rank)


def pytest_collection_finish(session):
    runs = fixtures.LabRuns(fixtures.module_scenarios(session.items))
    if not session.config.option.collectonly:
        runs.start_all()
    RUNS.append(runs)


def pytest_sessionfinish(session):
    for runs in RUNS:
        runs.cancel()


def pytest_terminal_summary(terminalreporter):
    for runs in RUNS:
        lines = runs.summary()
        if lines:
            terminalreporter.section("labs")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def lab_runs():
    return RUNS[-1]
