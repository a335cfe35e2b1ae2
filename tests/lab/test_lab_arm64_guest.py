"""The arm64 lab's own test: its KVM guests make exactly the exits they
promise.

    /usr/bin/python3 -m pytest -v tests/lab/test_lab_arm64_guest.py  (root)

Boots the arm64 lab (3-4 minutes under QEMU's emulator) and runs one
3-vCPU arm64_guest.py VM (arm64_scenario.py): per vCPU thread, every event
its report promises (kvm_exit by ret and ESR class, kvm_hvc_arm64,
kvm_wfx_arm64, kvm_guest_fault, kvm_userspace_exit from hist triggers;
kvm_sys_access and kvm_mmio from the trace) must be counted exactly, and
kvm_exit must count nothing else but host interrupts (ret 0, IRQ).  It
never skips: if the lab cannot run, it fails saying why.
"""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixtures import Scenario  # noqa: E402

SCENARIO = Scenario("arm64-guest", script="tests/lab/arm64_scenario.py",
                    lab="arm64", timeout=900,
                    env="KVMEXIT_LAB_ARM64_GUEST")
IRQ = 0


@pytest.fixture(scope="module")
def results(lab_runs):
    outdir = lab_runs.outdir(SCENARIO)
    with open(os.path.join(outdir, "arm64.json")) as f:
        return json.load(f)


def matching(rows, entry):
    want = {k: v for k, v in entry.items() if k != "count"}
    return sum(r.get("count", 1) for r in rows
               if all(r.get(k) == v for k, v in want.items()))


def vcpus(results):
    return results["guest"]["vcpus"]


def test_guest_reached_its_end(results):
    assert results["guest_status"] == 0
    for v in vcpus(results):
        assert v["errors"] == [], v
        assert v["user_detail"] == v["expected_user"]
        # Each WFI ended by one signal, seen as one KVM_EXIT_INTR.
        wfis = sum(int(step.rsplit(":", 1)[1]) for step in v["program"]
                   if step.startswith("wfi"))
        assert v["wakeups"] == wfis
        assert v["user_exits"].get("INTR", 0) == wfis


@pytest.mark.parametrize("event", ["kvm_exit", "kvm_hvc_arm64",
                                   "kvm_wfx_arm64", "kvm_guest_fault",
                                   "kvm_userspace_exit"])
def test_hist_counts_are_the_promised_ones(results, event):
    for v in vcpus(results):
        rows = [r for r in results["hist"][event]
                if r["common_pid"] == v["tid"]]
        promised = v["expected_events"].get(event, [])
        for entry in promised:
            assert matching(rows, entry) == entry["count"], (v["index"],
                                                             entry)
        extra = [r for r in rows if not any(
            matching([r], dict(e, count=None)) for e in promised)]
        if event == "kvm_exit":
            # Host interrupts while the vCPU ran: the only noise.
            extra = [r for r in extra if r["ret"] != IRQ]
        if event == "kvm_userspace_exit":
            extra = [r for r in extra if r["reason"] != 10]  # the INTRs
        assert extra == [], v["index"]


@pytest.mark.parametrize("event", ["kvm_sys_access", "kvm_mmio"])
def test_traced_events_are_the_promised_ones(results, event):
    for v in vcpus(results):
        seen = [e for e in results["traced"]
                if e["event"] == event and e["pid"] == v["tid"]]
        promised = v["expected_events"].get(event, [])
        assert sum(e["count"] for e in promised) == len(seen)
        for entry in promised:
            assert matching(seen, entry) == entry["count"], (v["index"],
                                                             entry)
