"""kvmexit on real VMX exits: the Intel lab (Bochs, tests/lab/intel.py).

    /usr/bin/python3 -m pytest -v tests/lab/test_lab_intel.py   (as root)

Boots the Intel lab once (about 15 minutes: Bochs boots Debian's kernel in
about 5, and each of the two bcc compiles takes minutes) and runs
tests/lab/intel_scenario.py there: one guest of two vCPU threads with
exactly known exits, watched by `kvmexit --probe raw` and `--probe
tracepoint`, and counted by the kernel's own hist trigger.  It never
skips: if the lab cannot run, the tests fail saying why.
"""

import json
import os
import re
import sys

import pytest

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [LAB_DIR, os.path.dirname(os.path.dirname(LAB_DIR))]
from fixtures import Scenario  # noqa: E402
import kvmexit  # noqa: E402

ISA_VMX = 1
# VMX basic exit reasons (arch/x86/include/uapi/asm/vmx.h).
CPUID, HLT, VMCALL, CR_ACCESS, IO_INSTRUCTION = 10, 12, 18, 28, 30
MSR_READ, MSR_WRITE = 31, 32
# Per vCPU, what intel_scenario.GUEST asks for: exact counts of the exits
# its program makes.
EXPECTED = [{IO_INSTRUCTION: 150, CR_ACCESS: 3, MSR_READ: 11, MSR_WRITE: 17,
             CPUID: 23, VMCALL: 31, HLT: 1},
            {IO_INSTRUCTION: 230, CR_ACCESS: 5, MSR_READ: 13, MSR_WRITE: 19,
             CPUID: 29, VMCALL: 37, HLT: 1}]


SCENARIO = Scenario("intel", script="tests/lab/intel_scenario.py",
                    lab="intel", timeout=2400, env="KVMEXIT_LAB_INTEL")


@pytest.fixture(scope="module")
def lab(lab_runs):
    return lab_runs.results(SCENARIO, "intel.json")


def vcpus(lab):
    return lab["guest"]["vcpus"]


def hist_counts(lab, tid):
    """{exit_reason: count} of one thread, from the hist trigger."""
    counts = {}
    for key, n in lab["hist"].items():
        t, code = map(int, key.split(","))
        if t == tid:
            counts[code] = n
    return counts


def report(lab, name):
    t = lab["tracers"][name]
    assert t["status"] == 0, t
    reports = [json.loads(line) for line in t["stdout"].splitlines()]
    assert len(reports) == 1, t["stdout"]
    return reports[0]


def tracer_counts(lab, name, tid):
    """{exit_code: count} of one thread, as kvmexit reported it."""
    rows = [r for r in report(lab, name)["rows"] if r["tid"] == tid]
    counts = {r["exit_code"]: r["count"] for r in rows}
    assert len(counts) == len(rows), rows
    return counts


def test_the_lab_cpu_is_intel_with_vmx(lab):
    assert lab["guest"]["isa"] == "vmx"
    assert lab["guest_status"] == 0
    for v in vcpus(lab):
        assert v["errors"] == [], v


def test_guest_exits_are_exact_in_the_kernel_count(lab):
    for v, expected in zip(vcpus(lab), EXPECTED):
        got = hist_counts(lab, v["tid"])
        assert {c: got.get(c, 0) for c in expected} == expected, got


def test_guest_report_expects_what_the_test_does(lab):
    """guest.py's own expectation matches the counts asserted here."""
    for v, expected in zip(vcpus(lab), EXPECTED):
        want = {}
        for entry in v["expected_events"]["kvm_exit"]:
            code = entry["exit_reason"]
            want[code] = want.get(code, 0) + entry["count"]
        assert want == expected


@pytest.mark.parametrize("probe", ["raw", "tracepoint"])
def test_kvmexit_equals_the_kernel_count_per_thread_and_reason(lab, probe):
    for v, expected in zip(vcpus(lab), EXPECTED):
        got = tracer_counts(lab, probe, v["tid"])
        # Every reason of the thread, noise (EPT_VIOLATION, interrupts)
        # included, as the kernel counted it; the program's exactly.
        assert got == hist_counts(lab, v["tid"])
        assert {c: got.get(c, 0) for c in expected} == expected


def test_raw_and_tracepoint_report_the_same_rows(lab):
    raw, tp = report(lab, "raw"), report(lab, "tracepoint")
    assert (raw["probe"], tp["probe"]) == ("raw-new", "tracepoint")
    fields = ("pid", "tid", "isa", "exit_code", "name", "count")
    assert [tuple(r[f] for f in fields) for r in raw["rows"]] == \
        [tuple(r[f] for f in fields) for r in tp["rows"]]
    # The raw probe reads vCPU ids from struct kvm_vcpu: the guest's.
    index = {v["tid"]: v["index"] for v in vcpus(lab)}
    assert {(r["tid"], r["vcpu_id"]) for r in raw["rows"]} == \
        set(index.items())
    assert raw["lost"] == tp["lost"] == 0
    assert {r["isa"] for r in raw["rows"]} == {"vmx"}


def test_probe_lines_say_which_probe_and_why(lab):
    raw = lab["tracers"]["raw"]["stderr"]
    assert re.search(r"^kvmexit: probe: raw-new \(kvm_exit\(vcpu, isa\): "
                     r"BTF: vcpu_vmx\.exit_reason at \d+\)$", raw, re.M), raw
    tp = lab["tracers"]["tracepoint"]["stderr"]
    assert "kvmexit: probe: tracepoint (asked for with --probe " \
        "tracepoint)" in tp


def test_every_vmx_name_is_the_kernels_own(lab):
    vmx_names, _ = kvmexit.parse_format_names(lab["format"])
    rows = report(lab, "raw")["rows"] + report(lab, "tracepoint")["rows"]
    seen = {(r["exit_code"], r["name"]) for r in rows}
    assert {code for code, _ in seen} >= set(EXPECTED[0])
    for code, name in seen:
        assert name == vmx_names[code], (code, name)
    assert vmx_names[IO_INSTRUCTION] == "IO_INSTRUCTION"
    assert vmx_names[VMCALL] == "VMCALL"
    assert vmx_names[CR_ACCESS] == "CR_ACCESS"
