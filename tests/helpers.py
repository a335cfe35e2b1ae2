"""Helpers that tests and benchmarks share, kept out of kvmexit.py."""

import sys
import time

import kvmexit


def print_report(selection, snap, names, out=None):
    """The text report of one snapshot, as kvmexit prints it."""
    kvmexit.TextReport(selection, names, out=out or sys.stdout).report(
        snap, None, time.time())


def program(max_threads, layout, features=()):
    """A kvmexit.Program of the raw-old probe over all threads."""
    return kvmexit.Program(kvmexit.Probe("raw-old", "test"),
                           kvmexit.Selection("all threads", "all"),
                           max_threads, layout, features)


def count_vcpus(proc="/proc"):
    """How many vCPUs all processes hold open now."""
    return sum(kvmexit.vmm_processes(proc).values())
