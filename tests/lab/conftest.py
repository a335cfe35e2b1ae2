"""The lab tests' session: every lab boots once for all the scenarios
the collected tests need (fixtures.py); the Intel lab starts as soon as
they are collected, in the background."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixtures  # noqa: E402

RUNS = []


def pytest_collection_finish(session):
    runs = fixtures.LabRuns(fixtures.module_scenarios(session.items))
    if not session.config.option.collectonly:
        runs.start_in_background("intel")
    RUNS.append(runs)


def pytest_sessionfinish(session):
    for runs in RUNS:
        runs.cancel()


@pytest.fixture(scope="session")
def lab_runs():
    return RUNS[-1]
