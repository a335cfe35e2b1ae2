"""kvmexit --detail on real arm64 exits: every sub-count against the exact
number the guest's program causes and the kernel's own count of the same
event (hist triggers), on the raw probe and on the tracepoint.

    /usr/bin/python3 -m pytest -v tests/lab/test_lab_arm64_detail.py (root)

Boots the arm64 lab once (tests/lab/arm64_detail.py): arm64_guest.py's
3 vCPUs (MMIO writes and reads, HVCs with PSCI, SMCCC and unknown function
ids, an SMC, WFIs, trapped system register reads) run under `kvmexit
--detail --json` (raw probe, and --probe tracepoint) and `kvmexit
--detail -a`.  If the lab cannot start, the tests fail with the reason.
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

# arm64 exit codes: a trap's ESR exception class.
WFX, HVC64, SMC64, SYS64, IABT_LOW, DABT_LOW = \
    0x01, 0x16, 0x17, 0x18, 0x20, 0x24
K = kvmexit.DETAIL_KINDS
ISA = kvmexit.ISA_ARM64
# What the BPF keeps of the ESRs (bpf/kvmexit.bpf.c, ESR_SYS64_REG and
# ESR_ABORT_BITS).
SYS64_REG, ABORT_BITS, PAGE = 0x3ffc1e, 0xfc00007f, ~0xfff
KVM_EXIT_MMIO, KVM_EXIT_INTR = 6, 10
PROBES = {"raw": "raw-arm64", "tracepoint": "tracepoint"}

SCENARIO = Scenario("arm64-detail", script="tests/lab/arm64_detail.py",
                    lab="arm64", timeout=1200, env="KVMEXIT_LAB_ARM64_DETAIL")


@pytest.fixture(scope="module")
def lab(lab_runs):
    with open(os.path.join(lab_runs.outdir(SCENARIO),
                           "arm64_detail.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module", params=sorted(PROBES))
def report(request, lab):
    t = lab["tracers"][request.param]
    assert t["status"] == 0 and "Traceback" not in t["stderr"], t
    reports = [json.loads(line) for line in t["stdout"].splitlines()]
    assert len(reports) == 1
    assert reports[0]["probe"] == PROBES[request.param]
    return reports[0]


def tool(report, tid, kind, code=None):
    """{Detail: count} kvmexit shows under one thread's reason (any reason
    if code is None)."""
    got = Counter()
    for row in report["rows"]:
        if row["tid"] == tid and code in (None, row["exit_code"]):
            for d in row["detail"]:
                if d["kind"] == kind:
                    got[Detail(d["kind"], d["key"], d["op"], d["size"],
                               d["name"])] += d["count"]
    return got


def hist(lab, event, keys, tid):
    return [r for r in lab["hist"][event][keys] if r["common_pid"] == tid]


def expected(vcpu, event, **fixed):
    return [e for e in vcpu["expected_events"].get(event, [])
            if all(e.get(k) == v for k, v in fixed.items())]


def decoded(kind, rows, key, attr):
    """Counter of Details from rows, with key(row) and attr(row) as the
    BPF takes them from the event's fields."""
    got = Counter()
    for r in rows:
        got[kvmexit.decode_detail(ISA, 0, K[kind], key(r), attr(r))] += \
            r["count"]
    return got


def iss(e):
    """A SYS64 trap's ESR bits that the BPF keeps, from kvm_sys_access's
    fields as the guest promised them."""
    return e["Op0"] << 20 | e["Op2"] << 17 | e["Op1"] << 14 | \
        e["CRn"] << 10 | e["CRm"] << 1


def signed(u64):
    """A hist trigger's value of a negative int field: as a u64."""
    return u64 - (1 << 64) if u64 >> 63 else u64


def sysreg(op0, op1, crn, crm, op2, name):
    return Detail("sysreg", op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2,
                  "read", name=name)


def test_nothing_lost_and_every_row_has_its_detail(report):
    assert (report["lost"], report["detail_lost"]) == (0, 0)
    assert all("detail" in row for row in report["rows"])


def test_wfi_or_wfe(lab, report):
    for v in vcpus(lab):
        want = decoded("wfx", expected(v, "kvm_wfx_arm64"),
                       lambda r: r["is_wfe"], lambda r: 0)
        kernel = decoded("wfx", hist(lab, "kvm_wfx_arm64", "is_wfe",
                                     v["tid"]),
                         lambda r: r["is_wfe"], lambda r: 0)
        assert tool(report, v["tid"], "wfx", WFX) == want == kernel
    assert tool(report, vcpus(lab)[1]["tid"], "wfx") == {
        Detail("wfx", 0, name="WFI"): 4}


def test_hvc_function_ids_with_psci_and_smccc_names(lab, report):
    for v in vcpus(lab):
        want = decoded("smccc", expected(v, "kvm_hvc_arm64"),
                       lambda r: r["r0"], lambda r: r["imm"])
        kernel = decoded("smccc", hist(lab, "kvm_hvc_arm64", "r0,imm",
                                       v["tid"]),
                         lambda r: r["r0"], lambda r: r["imm"])
        assert tool(report, v["tid"], "smccc", HVC64) == want == kernel
    zero, one, two = (tool(report, v["tid"], "smccc") for v in vcpus(lab))
    assert zero == {Detail("smccc", 0x84000000, name="PSCI_VERSION"): 5}
    assert one == {Detail("smccc", 0x12345678): 2}
    assert two == {Detail("smccc", 0x80000000, name="SMCCC_VERSION"): 1}


def test_smc_has_no_sub_key_on_6_1(lab, report):
    # Linux 6.1 traces no event of its own for an SMC it answers.
    rows = [r for r in report["rows"]
            if (r["tid"], r["exit_code"]) == (vcpus(lab)[1]["tid"], SMC64)]
    assert [(r["count"], r["detail"]) for r in rows] == [(1, [])]


def test_system_registers_by_name(lab, report):
    for v in vcpus(lab):
        want = decoded("sysreg", expected(v, "kvm_sys_access"), iss,
                       lambda r: 0 if r["is_write"] else 1)
        kernel = decoded("sysreg", hist(lab, "kvm_handle_sys_reg", "hsr",
                                        v["tid"]),
                         lambda r: r["hsr"] & SYS64_REG,
                         lambda r: r["hsr"] & 1)
        assert tool(report, v["tid"], "sysreg", SYS64) == want == kernel
    zero, one, two = (tool(report, v["tid"], "sysreg") for v in vcpus(lab))
    assert zero == {sysreg(3, 0, 0, 4, 0, "ID_AA64PFR0_EL1"): 3}
    assert one == {sysreg(2, 0, 1, 1, 4, "OSLSR_EL1"): 2,
                   sysreg(2, 0, 1, 0, 0, "MDRAR_EL1"): 1,
                   sysreg(3, 0, 1, 0, 1, "ACTLR_EL1"): 1}
    assert two == {sysreg(3, 0, 0, 6, 0, "ID_AA64ISAR0_EL1"): 2,
                   sysreg(3, 0, 0, 7, 0, "ID_AA64MMFR0_EL1"): 1}


def test_guest_abort_ipas_by_access(lab, report):
    for v in vcpus(lab):
        kernel = decoded("ipa", hist(lab, "kvm_guest_fault", "ipa,hsr",
                                     v["tid"]),
                         lambda r: r["ipa"] & PAGE,
                         lambda r: r["hsr"] & ABORT_BITS)
        assert tool(report, v["tid"], "ipa") == kernel
        # The guest's promise: its IPAs, and the access at each (the
        # fault's level depends on the host's stage-2 tables).
        got = Counter()
        for code in (IABT_LOW, DABT_LOW):
            for d, n in tool(report, v["tid"], "ipa", code).items():
                got[code, d.key, d.op] += n
        want = Counter({(IABT_LOW, v["code_ipa"], "fetch"): 1})
        for e in expected(v, "kvm_mmio"):
            if e["type"] != 1:          # a read's completion: no abort
                op = "write" if e["type"] == 2 else "read"
                want[DABT_LOW, e["gpa"] & PAGE, op] += e["count"]
        assert got == want
        assert sum(want.values()) == sum(
            e["count"] for e in expected(v, "kvm_guest_fault"))


def test_mmio_by_address_direction_and_size(lab, report):
    for v in vcpus(lab):
        want = decoded("mmio", expected(v, "kvm_mmio"), lambda r: r["gpa"],
                       lambda r: r["type"] | r["len"] << 8)
        got = tool(report, v["tid"], "mmio", DABT_LOW)
        assert got == want
        assert tool(report, v["tid"], "mmio") == got
        # The kernel's two triggers, each a projection of the sub-keys.
        for keys, part in (("gpa,type", lambda d: (d.key, d.op)),
                           ("gpa,len", lambda d: (d.key, d.size))):
            kernel = decoded("mmio", hist(lab, "kvm_mmio", keys, v["tid"]),
                             lambda r: r["gpa"],
                             lambda r: r.get("type", 0) | r.get("len", 0) << 8)
            mine = Counter()
            for d, n in got.items():
                mine[part(d)] += n
            theirs = Counter()
            for d, n in kernel.items():
                theirs[d.key, d.op if keys == "gpa,type" else d.size] += n
            assert mine == theirs, keys
    assert tool(report, vcpus(lab)[2]["tid"], "mmio") == {
        Detail("mmio", 0x10001000, "unsat-read", 8): 3,
        Detail("mmio", 0x10001000, "read", 8): 3,
        Detail("mmio", 0x10002000, "write", 1): 2,
        Detail("mmio", 0x0ffff000, "write", 4): 1}


def test_user_space_exits_under_the_exit_that_caused_them(lab, report):
    for v in vcpus(lab):
        kernel = decoded("user", hist(lab, "kvm_userspace_exit",
                                      "reason,errno", v["tid"]),
                         lambda r: r["reason"],
                         lambda r: -signed(r["errno"]) if signed(
                             r["errno"]) < 0 else 0)
        assert tool(report, v["tid"], "user") == kernel
        mmio = tool(report, v["tid"], "user", DABT_LOW)
        assert sum(mmio.values()) == sum(
            e["count"] for e in expected(v, "kvm_userspace_exit",
                                         reason=KVM_EXIT_MMIO))
        assert {d.key for d in mmio} == {KVM_EXIT_MMIO}
        # Each WFI ends in one signal, KVM_RUN's return with INTR.
        wfi = tool(report, v["tid"], "user", WFX)
        assert sum(wfi.values()) == v["wakeups"]
        assert {d.key for d in wfi} <= {KVM_EXIT_INTR}


def test_each_trap_has_its_one_sub_key(report):
    one_each = {WFX: "wfx", HVC64: "smccc", SYS64: "sysreg",
                IABT_LOW: "ipa", DABT_LOW: "ipa"}
    seen = set()
    for row in report["rows"]:
        kind = one_each.get(row["exit_code"])
        if kind:
            seen.add(row["exit_code"])
            assert sum(d["count"] for d in row["detail"]
                       if d["kind"] == kind) == row["count"], row
    assert seen == set(one_each)


def test_text_shows_each_reasons_sub_keys_under_it(lab):
    raw = json.loads(lab["tracers"]["raw"]["stdout"])
    t = lab["tracers"]["text"]
    assert t["status"] == 0 and "Traceback" not in t["stderr"], t
    lines = t["stdout"].splitlines()
    shown = 0
    for row in raw["rows"]:
        block = ["%-8u %-35s %-8u" % (row["tid"], row["name"],
                                      row["count"])]
        block += ["%-8s   %-33s %-8u" % ("", Detail(
            d["kind"], d["key"], d["op"], d["size"], d["name"]).label(),
            d["count"]) for d in row["detail"]]
        at = lines.index(block[0])
        assert lines[at:at + len(block)] == block
        shown += len(block) - 1
    assert shown > 20
    assert any(line.split() == ["sysreg", "OSLSR_EL1", "read", "2"]
               for line in lines)
