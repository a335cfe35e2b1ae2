"""The unit's capabilities on Debian's 6.1 kernel (the AMD lab), as user
nobody while a guest makes exits (tests/lab/caps.py): without CAP_BPF,
CAP_PERFMON or CAP_DAC_READ_SEARCH one line says which is missing.  With
all of the unit's set (CAP_SYS_PTRACE too), Debian's default
kernel.perf_event_paranoid=3 refuses perf_event_open(2), which needs
CAP_SYS_ADMIN there; at 2 the set counts every exit, as root does.
RLIMIT_MEMLOCK 0 changes nothing.  Runs in the same boot as the other
AMD scenarios; if the lab cannot start, the tests fail with the reason.
"""

import os
import sys

import pytest

import kvmexit
from helpers import HEADER_ALL


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import caps  # noqa: E402
from fixtures import Scenario  # noqa: E402

SCENARIO = Scenario("caps", script="tests/lab/caps.py", lab="amd2",
                    env="KVMEXIT_LAB_CAPS")
NAMES = kvmexit.ReasonNames()


@pytest.fixture(scope="module")
def lab(lab_runs):
    return lab_runs.results(SCENARIO, "caps.json")


def test_every_run_was_made(lab):
    assert sorted(lab["runs"]) == sorted(caps.runs())
    assert lab["kernel"].startswith("6.1.")


# What Debian's perf_event_open(2) says to a process without CAP_SYS_ADMIN
# while kernel.perf_event_paranoid is 3: bcc attaches kvmexit's tracepoint
# programs (sched_process_exit, for VM names, is the first) with it.
PERF_REFUSED = ("kvmexit: BPF load failed: perf_event_open(/sys/kernel/"
                "tracing/events/sched/sched_process_exit/id): Permission "
                "denied\n")


@pytest.mark.parametrize("cap, line", [
    ("bpf", "kvmexit: missing CAP_BPF (or CAP_SYS_ADMIN): needed to load "
     "and attach the BPF program"),
    ("perfmon", "kvmexit: missing CAP_PERFMON (or CAP_SYS_ADMIN): needed "
     "to load and attach the BPF program"),
    ("dac_read_search", "kvmexit: cannot search /sys/kernel/tracing for "
     "the kvm_exit tracepoint: missing CAP_DAC_READ_SEARCH"),
])
def test_without_one_capability_one_line_says_which(lab, cap, line):
    run = lab["runs"]["without_" + cap]
    assert cap not in run["caps"]
    assert (run["status"], run["stdout"], run["stderr"]) == \
        (1, "", line + "\n")
    assert run["guest_status"] == 0


def test_debians_perf_event_paranoid_3_refuses_the_units_set(lab):
    # Debian's own level 3 (its default): perf_event_open(2) needs
    # CAP_SYS_ADMIN, CAP_PERFMON is not enough.  The set less
    # CAP_SYS_PTRACE gets as far.
    assert lab["perf_event_paranoid"] == 3
    for name in ("full", "without_sys_ptrace"):
        run = lab["runs"][name]
        assert (run["status"], run["stdout"], run["stderr"]) == \
            (1, "", PERF_REFUSED), name
        assert run["guest_status"] == 0


def test_memlock_0_still_creates_the_maps_and_loads_the_program(lab):
    # Since 5.11 BPF memory is charged to the memory cgroup: with
    # RLIMIT_MEMLOCK 0, which nobody cannot raise, the maps are created and
    # the program loaded; the run stops where the unit's set stops.
    run = lab["runs"]["memlock0"]
    assert run["memlock"] == 0 and run["caps"] == list(caps.UNIT_CAPS)
    assert (run["status"], run["stdout"], run["stderr"]) == \
        (1, "", PERF_REFUSED)


def test_with_perf_event_paranoid_2_the_units_set_goes_as_far_as_root(lab):
    # The sysctl at 2 (upstream's most restrictive level) lets CAP_PERFMON
    # open perf events: the unit's set then ends where root ends.
    run, root = lab["runs"]["paranoid2"], lab["runs"]["root"]
    assert run["paranoid"] == 2 and root["caps"] is None
    assert "perf_event_open" not in run["stderr"]
    assert (run["status"], run["stderr"]) == (root["status"], root["stderr"])


def report_rows(stdout):
    """{(pid, tid, reason name): count} of a text report (no -a)."""
    lines = stdout.splitlines()
    assert lines[0] == ("Display kvm exit reasons and statistics for all "
                        "threads after sleeping %d secs." % caps.DURATION)
    assert lines[1] == HEADER_ALL
    rows = {}
    for line in lines[2:]:
        pid, tid, name, count = line.split()
        rows[(int(pid), int(tid), name)] = int(count)
    return rows


def kernel(run):
    """{(pid, tid, reason name): count} of the hist trigger's count: the
    guest's vCPUs only (nothing else in the lab exits to KVM)."""
    guest = run["guest"]
    tids = {v["tid"] for v in guest["vcpus"]}
    counts = {}
    for key, n in run["hist"].items():
        tid, code = map(int, key.split(","))
        assert tid in tids, key
        counts[(guest["pid"], tid, NAMES.name(2, code))] = n
    return counts


def test_with_perf_event_paranoid_2_the_units_set_counts_every_exit(lab):
    run = lab["runs"]["paranoid2"]
    assert run["status"] == 0 and run["guest_status"] == 0
    rows = report_rows(run["stdout"])
    assert rows == kernel(run)
    vcpu = run["guest"]["vcpus"][1]
    assert rows[(run["guest"]["pid"], vcpu["tid"], "IOIO")] == \
        vcpu["expected"]["IOIO"]
