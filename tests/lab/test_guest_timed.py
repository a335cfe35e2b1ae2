"""guest.py's timed mode on this machine's own KVM (no lab; as root).

The host's KVM fires no kvm_exit, but it runs guest.py's guests, so what
guest.py does itself can be checked here: a timed guest that never exits
to user space (10^9 CR4 round trips, each handled inside KVM, before its
first OUT) is ended by --run-limit and fails with a message, rather than
running for hours; a timed guest that exits often is not.
"""

import json
import os
import subprocess
import time

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
GUEST = os.path.join(LAB_DIR, "guest.py")


def timed_guest(tmp_path, cr4, limit):
    report = tmp_path / "r.json"
    started = time.monotonic()
    proc = subprocess.run(
        ["/usr/bin/python3", GUEST, "--vcpus", "2", "--cr4", str(cr4),
         "--seconds", "1", "--run-limit", str(limit), "--report",
         str(report)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, timeout=120)
    with open(report) as f:
        return proc, json.load(f), time.monotonic() - started


def test_a_guest_looping_inside_kvm_is_ended_with_a_message(tmp_path):
    proc, report, took = timed_guest(tmp_path, 10 ** 9, 3)
    assert proc.returncode == 1
    message = "KVM_RUN did not come back within 3 s: the guest ran on " \
        "inside KVM, never exiting to user space"
    assert proc.stderr.splitlines() == [f"guest.py: vCPU {i}: {message}"
                                        for i in (0, 1)]
    assert [v["errors"] for v in report["vcpus"]] == [[message]] * 2
    assert [v["user_exits"] for v in report["vcpus"]] == [{}, {}]
    assert 3 < took < 30


def test_a_guest_that_exits_runs_its_time_and_passes(tmp_path):
    proc, report, took = timed_guest(tmp_path, 10, 3)
    assert proc.returncode == 0, proc.stderr
    for v in report["vcpus"]:
        assert v["errors"] == []
        assert v["user_exits"]["IO"] > 100
        assert 1 <= v["seconds"] < 3
