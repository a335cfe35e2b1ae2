"""A real QEMU of 11 vCPUs, then a VM of 11 vCPUs, started after kvmexits
with a thread table of 4: counted exactly in the text report, the JSON
reports and a real Prometheus, the table grown while tracing, nothing
lost; and the exporter's --detail series (kvm_exit_details_total) of the
QEMU's port and MSR exits equal to the firmware's known counts and the
kernel's.

Boots the lab once (tests/lab/growth.py); the kernel's own counts are hist
triggers on kvm:kvm_exit (and kvm:kvm_msr).  Without the free table 11
threads would find room for 4.  Runs in CI; if the lab cannot start, the
tests fail with the reason.
"""

import json
import os
import sys

import pytest

import kvmexit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import growth  # noqa: E402
import qemu_vm  # noqa: E402
from fixtures import Scenario  # noqa: E402

IOIO, MSR, HLT, READ_CR4, WRITE_CR4 = 0x7b, 0x7c, 0x78, 0x04, 0x14
NAMES = kvmexit.ReasonNames()


SCENARIO = Scenario("growth", script="tests/lab/growth.py", lab="amd2",
                    env="KVMEXIT_LAB_GROWTH")


@pytest.fixture(scope="module")
def lab(lab_runs):
    return lab_runs.results(SCENARIO, "growth.json")


# The two VMs: (report key in growth.json, -name guest=).
GUEST, QEMU = ("guest", growth.VM), ("qemu", growth.QEMU_VM)


def vcpus(lab, vm=GUEST):
    """{tid: vCPU index} of a VM's vCPU threads."""
    return {v["tid"]: v["index"] for v in lab[vm[0]]["vcpus"]}


def kernel(lab, vm=GUEST):
    """{(tid, code): count} from the hist trigger, one VM's vCPU threads."""
    threads = vcpus(lab, vm)
    counts = {}
    for key, n in lab["hist"].items():
        tid, code = map(int, key.split(","))
        if tid in threads:
            counts[(tid, code)] = n
    return counts


def tracer(lab, name):
    t = lab["tracers"][name]
    assert t["status"] == 0, t
    assert "Traceback" not in t["stderr"], t["stderr"]
    assert "were not counted" not in t["stderr"]
    assert "cannot grow" not in t["stderr"]
    return t


def test_eleven_vcpus_made_their_exits_in_the_kernel_count(lab):
    assert lab["guest_status"] == 0
    assert sorted(vcpus(lab).values()) == list(range(growth.VCPUS))
    counts = kernel(lab)
    for v in lab["guest"]["vcpus"]:
        assert counts[(v["tid"], IOIO)] == v["expected"]["IOIO"]
        assert counts[(v["tid"], READ_CR4)] == v["cr4"]
        assert counts[(v["tid"], WRITE_CR4)] == v["cr4"]
        assert counts[(v["tid"], HLT)] == 1


def test_the_real_qemus_vcpus_made_their_exits_in_the_kernel_count(lab):
    assert lab["qemu_status"] == 0, lab["qemu"]
    assert lab["qemu"]["status"] == qemu_vm.EXIT_STATUS
    assert sorted(vcpus(lab, QEMU).values()) == list(range(qemu_vm.VCPUS))
    counts = kernel(lab, QEMU)
    for tid, n in vcpus(lab, QEMU).items():
        assert counts[(tid, IOIO)] == qemu_vm.outs(n) + (n == 0)
        assert counts[(tid, MSR)] == qemu_vm.msr_reads(n) + 4 * (n == 0)


@pytest.mark.parametrize("vm", [GUEST, QEMU], ids=["guest", "qemu"])
def test_the_text_report_has_every_exit(lab, vm):
    pid = lab[vm[0]]["pid"]
    got = {}
    for line in tracer(lab, "text")["stdout"].splitlines():
        # PID COMM TID REASON COUNT, COMM as 'comm guest=NAME'
        fields = line.split()
        if len(fields) >= 5 and fields[0] == str(pid):
            got[(int(fields[-3]), fields[-2])] = int(fields[-1])
            assert " ".join(fields[1:-3]).endswith("guest=" + vm[1])
    assert got == {(tid, NAMES.name(2, code)): n
                   for (tid, code), n in kernel(lab, vm).items()}


@pytest.mark.parametrize("vm", [GUEST, QEMU], ids=["guest", "qemu"])
def test_the_json_reports_add_up_to_every_exit(lab, vm):
    reports = [json.loads(line) for line in
               tracer(lab, "json")["stdout"].splitlines()]
    assert [r["lost"] for r in reports] == [0] * len(reports)
    total = {}
    for r in reports:
        for row in r["rows"]:
            if row["pid"] == lab[vm[0]]["pid"]:
                key = (row["tid"], row["exit_code"])
                total[key] = total.get(key, 0) + row["count"]
    assert total == kernel(lab, vm)


def test_prometheus_has_every_exit_and_the_grown_table(lab):
    tracer(lab, "exporter")
    expected = {}
    for vm in (GUEST, QEMU):
        threads = vcpus(lab, vm)
        pid = str(lab[vm[0]]["pid"])
        expected.update({(vm[1], pid, str(threads[tid]), "svm",
                          NAMES.name(2, code)): n
                         for (tid, code), n in kernel(lab, vm).items()})
    got = {(m["vm"], m["pid"], m["vcpu"], m["isa"], m["reason"]): value
           for m, value in lab["promql"]["exits"]}
    assert got == expected
    assert {v for _, v in lab["promql"]["lost"]} == {0}
    # 4, the free 8, and the 16 added once a thread entered the 8: by the
    # QEMU's threads; the VM's, after the QEMU's were retired, fit again.
    assert [v for _, v in lab["qemu_capacity"]] == [4 + 8 + 16]
    assert [v for _, v in lab["promql"]["capacity"]] == [4 + 8 + 16]
    assert [v for _, v in lab["promql"]["at_limit"]] == [0]


# -- --detail exported: the QEMU's port and MSR exits ----------------------

def kernel_details(lab):
    """{(vcpu, reason, kind, key, op, name): count} of the QEMU's port and
    MSR exits from the hist triggers, each sub-key decoded and labelled as
    the exporter does."""
    threads = vcpus(lab, QEMU)
    svm, kinds = kvmexit.ISA_SVM, kvmexit.DETAIL_KINDS
    sources = (
        ("kvm_exit", "exit_reason,info1", IOIO, "port",
         lambda r: (r["info1"] >> 16, r["info1"] & 0x7f),
         lambda r: r["exit_reason"] == IOIO),
        ("kvm_msr", "ecx,write", MSR, "msr",
         lambda r: (r["ecx"], r["write"]), lambda r: True),
    )
    counts = {}
    for event, keys, code, kind, fields, wanted in sources:
        for r in lab["detail_hist"][event][keys]:
            if r["common_pid"] in threads and wanted(r):
                detail = kvmexit.decode_detail(svm, code, kinds[kind],
                                               *fields(r))
                key = (str(threads[r["common_pid"]]), NAMES.name(2, code)) \
                    + kvmexit.detail_labels(detail)
                counts[key] = counts.get(key, 0) + r["count"]
    return counts


def exported_details(lab):
    """The same, from Prometheus: the QEMU's series of kind port or msr
    (Prometheus stores no label whose value is empty)."""
    return {(m["vcpu"], m["reason"], m["kind"], m["key"], m.get("op", ""),
             m.get("name", "")): value
            for m, value in lab["promql"]["details"]
            if m["vm"] == growth.QEMU_VM and m["kind"] in ("port", "msr")}


def test_details_exported_equal_the_kernels_counts(lab):
    tracer(lab, "exporter")
    assert exported_details(lab) == kernel_details(lab)
    assert [m for m, _ in lab["promql"]["details_dropped"]
            if m.get("vm") == growth.QEMU_VM] == []
    assert {v for _, v in lab["promql"]["details_lost"]} == {0}


def test_details_exported_are_the_firmwares_exits(lab):
    """Each vCPU's known port writes and MSR accesses, the key written as
    the text report writes it."""
    names = {qemu_vm.MSR: "IA32_APIC_BASE", 0x830: "X2APIC_ICR"}
    reasons = {"port": NAMES.name(2, IOIO), "msr": NAMES.name(2, MSR)}
    want = {}
    for n in range(qemu_vm.VCPUS):
        for (kind, key, op), count in qemu_vm.expected(n).items():
            text_key = kvmexit.LABEL_KEY[kind](key).split()[-1]
            want[(str(n), reasons[kind], kind, text_key, op,
                  names.get(key, "") if kind == "msr" else "")] = count
    assert exported_details(lab) == want
    assert want[("0", reasons["port"], "port", "0x510", "out", "")] == 20
