"""--detail's arm64 sub-keys in Python: WFI/WFE, SMCCC function ids, trapped
system registers, guest aborts' IPAs; their names checked against the
kernel's own headers.  The kernel side runs in the arm64 lab
(tests/lab/test_lab_arm64_detail.py)."""

import glob
import re

import pytest

import kvmexit

K = kvmexit.DETAIL_KINDS
# The kernel's headers that kvmexit compiles against (.ci/install): their
# -common package holds arm64's too.
HEADERS = "/usr/src/linux-headers-*-common"


def label(kind, key, attr=0):
    return kvmexit.decode_detail(0, 0, K[kind], key, attr).label()


def header(path):
    found = sorted(glob.glob("%s/%s" % (HEADERS, path)))
    assert found, "no %s/%s: install the kernel headers" % (HEADERS, path)
    with open(found[-1]) as f:
        return f.read()


def test_arm64_kinds_are_new_numbers_shared_with_the_c():
    for name in ("wfx", "smccc", "sysreg", "ipa"):
        assert "-DDETAIL_%s=%d" % (name.upper(), K[name]) in \
            kvmexit.detail_macros()
    assert sorted(K.values()) == list(range(1, 13))


@pytest.mark.parametrize("is_wfe, text", [(0, "WFI"), (1, "WFE")])
def test_wfx_is_wfi_or_wfe(is_wfe, text):
    assert label("wfx", is_wfe) == text


@pytest.mark.parametrize("fid, imm, text", [
    (0x84000000, 0, "smccc 0x84000000 PSCI_VERSION"),
    (0x84000002, 0, "smccc 0x84000002 PSCI_CPU_OFF"),
    (0x84000003, 0, "smccc 0x84000003 PSCI_CPU_ON"),
    (0xc4000003, 0, "smccc 0xc4000003 PSCI_CPU_ON64"),
    (0xc4000004, 0, "smccc 0xc4000004 PSCI_AFFINITY_INFO64"),
    (0x84000008, 0, "smccc 0x84000008 PSCI_SYSTEM_OFF"),
    (0x8400000a, 0, "smccc 0x8400000a PSCI_FEATURES"),
    (0xc4000012, 0, "smccc 0xc4000012 PSCI_SYSTEM_RESET264"),
    (0x80000000, 0, "smccc 0x80000000 SMCCC_VERSION"),
    (0x80000001, 0, "smccc 0x80000001 SMCCC_ARCH_FEATURES"),
    (0x80008000, 0, "smccc 0x80008000 SMCCC_ARCH_WORKAROUND_1"),
    (0x80007fff, 0, "smccc 0x80007fff SMCCC_ARCH_WORKAROUND_2"),
    (0x80003fff, 0, "smccc 0x80003fff SMCCC_ARCH_WORKAROUND_3"),
    (0x84000053, 0, "smccc 0x84000053 TRNG_RND32"),
    (0xc4000053, 0, "smccc 0xc4000053 TRNG_RND64"),
    (0xc5000021, 0, "smccc 0xc5000021 PV_TIME_ST"),
    (0x8600ff01, 0, "smccc 0x8600ff01 VENDOR_HYP_CALL_UID"),
    (0x86000000, 0, "smccc 0x86000000 KVM_FEATURES"),
    (0x86000001, 0, "smccc 0x86000001 KVM_PTP"),
    # Not in the table: a fast call by its service, else no name.
    (0x82000010, 0, "smccc 0x82000010 SIP call"),
    (0xf2000001, 0, "smccc 0xf2000001 TRUSTED_OS call"),
    (0x86000002, 0, "smccc 0x86000002 VENDOR_HYP call"),
    (0x12345678, 0, "smccc 0x12345678"),
    (0x82010000, 0, "smccc 0x82010000"),       # bits 23:16 must be zero
    (0x84000000, 5, "smccc 0x84000000 imm 5 PSCI_VERSION"),
])
def test_smccc_function_ids_named(fid, imm, text):
    assert label("smccc", fid, imm) == text


# ESRs of real SYS64 traps (EC 0x18, IL) as the kernel traces them; the BPF
# keeps Op0, Op2, Op1, CRn, CRm (ESR_SYS64_REG) and the direction bit.
@pytest.mark.parametrize("esr, text", [
    # mrs x11, ID_AA64PFR0_EL1
    (0x62300169, "sysreg ID_AA64PFR0_EL1 read"),
    # mrs x11, OSLSR_EL1
    (0x62280563, "sysreg OSLSR_EL1 read"),
    # msr CNTV_CTL_EL0, x0
    (0x6232f806, "sysreg CNTV_CTL_EL0 write"),
    # msr ICC_SGI1R_EL1, x3
    (0x623a3076, "sysreg ICC_SGI1R_EL1 write"),
    # mrs x0, PMEVCNTR9_EL0
    (0x6232f813, "sysreg PMEVCNTR9_EL0 read"),
    # mrs x0, S3_3_C15_C0_0 (IMPLEMENTATION DEFINED: no name)
    (0x6230fc01, "sysreg S3_3_C15_C0_0 read"),
])
def test_sysreg_named_from_the_trap_esr(esr, text):
    sub, attr = esr & 0x3ffc1e, esr & 1
    assert label("sysreg", sub, attr) == text


def test_sysreg_key_is_kvms_register_id_order():
    detail = kvmexit.decode_detail(0, 0, K["sysreg"], 0x32f806, 0)
    assert detail.key == 3 << 14 | 3 << 11 | 14 << 7 | 3 << 3 | 1 == 0xdf19
    assert kvmexit.sysreg_fields(detail.key) == (3, 3, 14, 3, 1)
    assert detail.name == "CNTV_CTL_EL0"
    assert kvmexit.detail_labels(detail) == (
        "sysreg", "S3_3_C14_C3_1", "write", "CNTV_CTL_EL0")
    assert kvmexit.detail_record(detail, 7) == {
        "kind": "sysreg", "key": 0xdf19, "op": "write", "size": None,
        "name": "CNTV_CTL_EL0", "count": 7}


def test_every_lab_register_is_named():
    # The registers arm64_guest.py reads in the lab.
    for name, enc in (("ID_AA64PFR0_EL1", (3, 0, 0, 4, 0)),
                      ("ID_AA64ISAR0_EL1", (3, 0, 0, 6, 0)),
                      ("ID_AA64MMFR0_EL1", (3, 0, 0, 7, 0)),
                      ("ACTLR_EL1", (3, 0, 1, 0, 1)),
                      ("MDRAR_EL1", (2, 0, 1, 0, 0)),
                      ("OSLSR_EL1", (2, 0, 1, 1, 4))):
        assert kvmexit.SYSREG_NAMES[enc] == name


def test_sysreg_names_agree_with_the_kernels_header():
    """Every register asm/sysreg.h spells out as sys_reg(...) that the
    table has, under the same name and encoding."""
    defined = {name: tuple(int(n) for n in enc) for name, *enc in re.findall(
        r"#define SYS_(\w+)\s+sys_reg\((\d+), (\d+), (\d+), (\d+), (\d+)\)",
        header("arch/arm64/include/asm/sysreg.h"))}
    by_name = {name: enc for enc, name in kvmexit.SYSREG_NAMES.items()}
    assert len(by_name) == len(kvmexit.SYSREG_NAMES) == 312
    checked = 0
    for name, enc in defined.items():
        if name in by_name:
            assert by_name[name] == enc, name
            checked += 1
        if enc in kvmexit.SYSREG_NAMES:
            assert kvmexit.SYSREG_NAMES[enc] == name, enc
    # The rest (ID_AA64*, SCTLR_EL1, ...) are generated in 6.1's build.
    assert checked == 140


def test_psci_names_agree_with_the_kernels_uapi_header():
    defined = re.findall(r"#define PSCI_\d_\d_FN(64)?_(\w+)\s+"
                         r"PSCI_0_2_FN(?:64)?\((\d+)\)",
                         header("include/uapi/linux/psci.h"))
    assert len(defined) == 33
    for is64, name, n in defined:
        fid = (0xc4000000 if is64 else 0x84000000) + int(n)
        want = "PSCI_" + name.replace("PSCI_", "") + ("64" if is64 else "")
        assert kvmexit.SMCCC_FUNCTIONS[fid] == want


@pytest.mark.parametrize("esr, text", [
    # str to an unbacked IPA: DABT_LOW, WnR, translation fault level 2
    (0x92000046, "ipa 0x10000000 write translation L2"),
    (0x93c08006, "ipa 0x10000000 read translation L2"),
    (0x9200004f, "ipa 0x10000000 write permission L3"),
    (0x9200000b, "ipa 0x10000000 read access-flag L3"),
    (0x92000010, "ipa 0x10000000 read external"),
    (0x92000035, "ipa 0x10000000 read fault 0x35"),
    # the first fetch from a page: IABT_LOW (WnR means nothing there)
    (0x82000006, "ipa 0x10000000 fetch translation L2"),
    (0x82000047, "ipa 0x10000000 fetch translation L3"),
])
def test_guest_abort_ipa_access_and_fault(esr, text):
    assert label("ipa", 0x10000000, esr & 0xfc00007f) == text


def test_arm64_mmio_and_user_exits_as_on_x86():
    assert label("mmio", 0x10001000, 0 | 8 << 8) == \
        "mmio 0x10001000 unsat-read 8B"
    assert label("mmio", 0x10000000, 2 | 4 << 8) == \
        "mmio 0x10000000 write 4B"
    assert label("user", 6) == "to user space KVM_EXIT_MMIO"


@pytest.mark.parametrize("kind, key, attr, labels", [
    ("wfx", 0, 0, ("wfx", "0", "", "WFI")),
    ("smccc", 0xc4000003, 0, ("smccc", "0xc4000003", "", "PSCI_CPU_ON64")),
    ("ipa", 0x2000, 0x82000006, ("ipa", "0x2000", "fetch",
                                 "translation L2")),
])
def test_prometheus_labels_of_arm64_sub_keys(kind, key, attr, labels):
    detail = kvmexit.decode_detail(0, 0, K[kind], key, attr)
    assert kvmexit.detail_labels(detail) == labels


@pytest.mark.parametrize("requested, kind", [("auto", "raw-arm64"),
                                             ("raw", "raw-arm64"),
                                             ("tracepoint", "tracepoint")])
def test_detail_on_arm64_takes_either_probe(tmp_path, requested, kind):
    # arm64's kvm_exit holds no exit information: the raw probe, cheaper,
    # serves --detail as well (x86's takes the tracepoint).
    tp = tmp_path / "kvm_exit"
    tp.mkdir()
    (tp / "format").write_text("field:int ret;\nfield:unsigned int esr_ec;\n")
    probe = kvmexit.choose_probe(requested, str(tp), str(tmp_path),
                                 detail=True, kvm="arm64")
    assert probe.kind == kind
    assert "-DKVM_ARM64" in probe.macros()
