"""kvmexit --detail on real exits: every sub-count against the exact number
the guest's program causes and the kernel's own count of the same
tracepoint (hist triggers).

Boots the lab once (tests/lab/detail_scenario.py): a guest whose two vCPUs
write and read chosen ports, MSRs and MMIO addresses, make chosen
hypercalls and take chosen exceptions runs under `kvmexit --detail
--latency --json` and `kvmexit --detail -a`.  Runs in CI; if the lab
cannot start, the tests fail with the reason.
"""

import json
import os
import sys
from collections import Counter

import pytest

import kvmexit
from kvmexit import Detail

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixtures import Scenario  # noqa: E402
from fixtures import guest_vcpus as vcpus  # noqa: E402

SVM = kvmexit.ISA_SVM
IOIO, MSR, VMMCALL, NPF, HLT = 0x7b, 0x7c, 0x81, 0x400, 0x78
EXCP_BP, EXCP_UD = 0x43, 0x46
K = kvmexit.DETAIL_KINDS


SCENARIO = Scenario("detail", script="tests/lab/detail_scenario.py",
                    lab="amd2", env="KVMEXIT_LAB_DETAIL")


@pytest.fixture(scope="module")
def lab(lab_runs):
    return lab_runs.results(SCENARIO, "detail.json")


@pytest.fixture(scope="module")
def report(lab):
    t = lab["tracers"]["json"]
    assert t["status"] == 0 and "Traceback" not in t["stderr"], t
    reports = [json.loads(line) for line in t["stdout"].splitlines()]
    assert len(reports) == 1
    return reports[0]


def tool(report, tid, code, kind):
    """{Detail: count} kvmexit shows under one thread's reason."""
    got = Counter()
    for row in report["rows"]:
        if (row["tid"], row["exit_code"]) == (tid, code):
            for d in row["detail"]:
                if d["kind"] == kind:
                    got[Detail(d["kind"], d["key"], d["op"], d["size"],
                               d["name"])] += d["count"]
    return got


def hist(lab, event, keys, tid, **fixed):
    """[row] of a hist trigger for one thread (and fixed field values)."""
    rows = lab["hist"][event][keys]
    return [r for r in rows if r["common_pid"] == tid and
            all(r[k] == v for k, v in fixed.items())]


def expected(vcpu, event, **fixed):
    return [e for e in vcpu["expected_events"].get(event, [])
            if all(e.get(k) == v for k, v in fixed.items())]


def decoded(kind, rows, key, attr, code=0):
    """Counter of Details from rows, key(row) and attr(row) as the kernel
    takes them from the tracepoint's fields."""
    got = Counter()
    for r in rows:
        got[kvmexit.decode_detail(SVM, code, K[kind], key(r), attr(r))] += \
            r["count"]
    return got


def test_nothing_lost_and_every_row_has_its_detail(report):
    assert (report["lost"], report["detail_lost"]) == (0, 0)
    assert report["probe"] == "tracepoint"
    assert all("detail" in row for row in report["rows"])


def test_ports_by_direction_and_size(lab, report):
    for v in vcpus(lab):
        port = lambda r: r["info1"] >> 16
        access = lambda r: r["info1"] & 0x7f
        want = decoded("port", expected(v, "kvm_exit", exit_reason=IOIO),
                       port, access)
        kernel = decoded("port", hist(lab, "kvm_exit", "exit_reason,info1",
                                      v["tid"], exit_reason=IOIO),
                         port, access)
        assert tool(report, v["tid"], IOIO, "port") == want == kernel
    first = tool(report, vcpus(lab)[0]["tid"], IOIO, "port")
    assert first[Detail("port", 0x70, "out", 1)] == 10
    assert first[Detail("port", 0x71, "in", 1)] == 7
    assert first[Detail("port", 0x510, "out", 2)] == 5
    assert first[Detail("port", 0xcfc, "in", 4)] == 3


def test_port_sub_counts_add_up_to_the_reason(lab, report):
    for row in report["rows"]:
        if row["exit_code"] == IOIO:
            assert sum(d["count"] for d in row["detail"]
                       if d["kind"] == "port") == row["count"]


def test_msrs_by_index_and_direction(lab, report):
    for v in vcpus(lab):
        want = decoded("msr", expected(v, "kvm_msr"), lambda r: r["ecx"],
                       lambda r: r["write"])
        kernel = decoded("msr", hist(lab, "kvm_msr", "ecx,write", v["tid"]),
                         lambda r: r["ecx"], lambda r: r["write"])
        assert tool(report, v["tid"], MSR, "msr") == want == kernel
    zero, one = (tool(report, v["tid"], MSR, "msr") for v in vcpus(lab))
    assert zero == {Detail("msr", 0x1b, "read", name="IA32_APIC_BASE"): 6,
                    Detail("msr", 0x6e0, "write",
                           name="IA32_TSC_DEADLINE"): 4}
    assert one == {Detail("msr", 0x1b, "write", name="IA32_APIC_BASE"): 3}


def test_hypercalls_by_number(lab, report):
    for v in vcpus(lab):
        want = decoded("hypercall", expected(v, "kvm_hypercall"),
                       lambda r: r["nr"], lambda r: 0)
        kernel = decoded("hypercall", hist(lab, "kvm_hypercall", "nr",
                                           v["tid"]),
                         lambda r: r["nr"], lambda r: 0)
        assert tool(report, v["tid"], VMMCALL, "hypercall") == want == kernel
    assert [tool(report, v["tid"], VMMCALL, "hypercall")
            for v in vcpus(lab)] == [{Detail("hypercall", 0x99): 4},
                                     {Detail("hypercall", 0x77): 2}]


def test_mmio_by_address_type_and_size(lab, report):
    for v in vcpus(lab):
        got = tool(report, v["tid"], NPF, "mmio")
        by_type = Counter()
        by_len = Counter()
        for d, n in got.items():
            by_type[(d.key, d.op)] += n
            by_len[(d.key, d.size)] += n
        types = kvmexit.MMIO_TYPES
        want = Counter({(e["gpa"], types[e["type"]]): e["count"]
                        for e in expected(v, "kvm_mmio")})
        kernel = Counter({(r["gpa"], types[r["type"]]): r["count"]
                          for r in hist(lab, "kvm_mmio", "gpa,type",
                                        v["tid"])})
        assert by_type == want == kernel
        assert by_len == Counter({(r["gpa"], r["len"]): r["count"]
                                  for r in hist(lab, "kvm_mmio", "gpa,len",
                                                v["tid"])})
    zero = tool(report, vcpus(lab)[0]["tid"], NPF, "mmio")
    assert zero[Detail("mmio", 0xd0000000, "write", 4)] == 3
    assert zero[Detail("mmio", 0xd0000010, "unsat-read", 2)] == 2
    assert zero[Detail("mmio", 0xd0000010, "read", 2)] == 2


def test_npf_pages_are_the_kernels(lab, report):
    for v in vcpus(lab):
        got = tool(report, v["tid"], NPF, "page")
        pages = Counter()
        for d, n in got.items():
            pages[d.key] += n
        kernel = Counter()
        for r in hist(lab, "kvm_exit", "exit_reason,info2", v["tid"],
                      exit_reason=NPF):
            kernel[r["info2"] & ~0xfff] += r["count"]
        assert pages == kernel
        npf = [row["count"] for row in report["rows"]
               if (row["tid"], row["exit_code"]) == (v["tid"], NPF)]
        assert sum(pages.values()) == sum(npf)
    # Each MMIO access is an NPF on its page.
    zero = tool(report, vcpus(lab)[0]["tid"], NPF, "page")
    assert sum(n for d, n in zero.items() if d.key == 0xd0000000) == 5


def test_exception_vectors(lab, report):
    for v in vcpus(lab):
        for code in (EXCP_UD, EXCP_BP):
            n = sum(e["count"] for e in expected(v, "kvm_exit",
                                                 exit_reason=code))
            kernel = sum(r["count"] for r in hist(
                lab, "kvm_exit", "exit_reason,info1", v["tid"],
                exit_reason=code))
            want = {Detail("vector", code - 0x40, "exception",
                           name="#" + kvmexit.SVM_EXCEPTIONS[code - 0x40]):
                    n} if n else {}
            assert tool(report, v["tid"], code, "vector") == want
            assert n == kernel
    assert [sum(tool(report, v["tid"], EXCP_UD, "vector").values())
            for v in vcpus(lab)] == [2, 1]


def test_returns_to_user_space_once_per_exit(lab, report):
    for v in vcpus(lab):
        got = Counter()
        for row in report["rows"]:
            if row["tid"] == v["tid"]:
                for d in row["detail"]:
                    if d["kind"] == "user":
                        got[d["key"]] += d["count"]
        want = Counter({e["reason"]: e["count"]
                        for e in expected(v, "kvm_userspace_exit")})
        kernel = Counter({r["reason"]: r["count"] for r in hist(
            lab, "kvm_userspace_exit", "reason,errno", v["tid"])})
        assert got == want == kernel
    zero = vcpus(lab)[0]["tid"]
    # Each under the exit that went out: port I/O, MMIO, the MSR KVM does
    # not know, and the final HLT.
    assert tool(report, zero, IOIO, "user") == {
        Detail("user", 2, name="KVM_EXIT_IO"): 25}
    assert tool(report, zero, MSR, "user") == {
        Detail("user", 29, name="KVM_EXIT_X86_RDMSR"): 2}
    assert tool(report, zero, NPF, "user") == {
        Detail("user", 6, name="KVM_EXIT_MMIO"): 5}
    assert tool(report, zero, HLT, "user") == {
        Detail("user", 5, name="KVM_EXIT_HLT"): 1}


def test_latency_percentiles_are_ordered(report):
    timed = [r for r in report["rows"] if r["p50_ns"] is not None]
    assert timed
    for r in timed:
        assert 0 < r["p50_ns"] <= r["p90_ns"] <= r["p99_ns"] <= r["max_ns"]


def test_text_shows_each_reasons_sub_keys_under_it(lab, report):
    t = lab["tracers"]["text"]
    assert t["status"] == 0 and "Traceback" not in t["stderr"], t
    lines = t["stdout"].splitlines()
    for v in vcpus(lab):
        for row in report["rows"]:
            if row["tid"] != v["tid"]:
                continue
            block = ["%-8u %-35s %-8u" % (v["tid"], row["name"],
                                          row["count"])]
            block += ["%-8s   %-33s %-8u" % ("", Detail(
                d["kind"], d["key"], d["op"], d["size"], d["name"]).label(),
                d["count"]) for d in row["detail"]]
            at = lines.index(block[0])
            assert lines[at:at + len(block)] == block
