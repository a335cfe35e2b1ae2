"""Exit reason names (VMX, SVM, the running kernel's tracepoint format),
the counter slot layout, and the kernel's CPU list format."""

import glob
import os
import re

import pytest

import kvmexit

VMX, SVM = kvmexit.ISA_VMX, kvmexit.ISA_SVM
FORMAT = "/sys/kernel/tracing/events/kvm/kvm_exit/format"


@pytest.fixture
def names():
    return kvmexit.ReasonNames()


#
# Static tables
#
@pytest.mark.parametrize("code,name", [
    (0, "EXCEPTION_NMI"), (1, "EXTERNAL_INTERRUPT"), (10, "CPUID"),
    (12, "HLT"), (28, "CR_ACCESS"), (30, "IO_INSTRUCTION"),
    (31, "MSR_READ"), (32, "MSR_WRITE"), (48, "EPT_VIOLATION"),
    (49, "EPT_MISCONFIG"), (75, "NOTIFY"),
])
def test_vmx_names(names, code, name):
    assert names.name(VMX, code) == name


@pytest.mark.parametrize("code,name", [
    (0x04, "READ_CR4"), (0x14, "WRITE_CR4"), (0x00, "READ_CR0"),
    (0x60, "INTR"), (0x72, "CPUID"), (0x78, "HLT"), (0x7b, "IOIO"),
    (0x7c, "MSR"), (0x81, "VMMCALL"), (0x4e, "EXCP_PF"), (0x94,
                                                            "CR4_WRITE_TRAP"),
    (0xa2, "INVPCID"), (0x400, "NPF"), (0x401, "AVIC_INCOMPLETE_IPI"),
    (0x403, "VMGEXIT"), (0xffffffff, "ERR"),
])
def test_svm_names(names, code, name):
    assert names.name(SVM, code) == name


@pytest.mark.parametrize("code,shown", [(5, "5"), (35, "35"), (76, "76"),
                                        (99, "99"), (0x9999, "39321")])
def test_unknown_vmx_codes_show_as_decimal_numbers(names, code, shown):
    assert names.name(VMX, code) == shown


@pytest.mark.parametrize("code,shown", [(0x0f, "0xf"), (0xa3, "0xa3"),
                                        (0x404, "0x404"),
                                        (0x9999, "0x9999"),
                                        (0x80000030, "0x80000030")])
def test_unknown_svm_codes_show_as_hex_numbers(names, code, shown):
    assert names.name(SVM, code) == shown


@pytest.mark.parametrize("code,shown", [
    (0x80000021, "INVALID_STATE|FAILED_VMENTRY"),
    (0x80000022, "MSR_LOAD_FAIL|FAILED_VMENTRY"),
    (0x80000029, "MCE_DURING_VMENTRY|FAILED_VMENTRY"),
    (0x80000030, "EPT_VIOLATION|FAILED_VMENTRY"),
    (0x80000063, "99|FAILED_VMENTRY"),
])
def test_vmx_failed_vmentry_flag(names, code, shown):
    assert names.name(VMX, code) == shown


def test_the_table_follows_the_isa_not_the_code(names):
    # 12 is VMX HLT; as SVM it is 0xc, which has no name.
    assert (names.name(VMX, 12), names.name(SVM, 12)) == ("HLT", "0xc")
    assert (names.name(VMX, 0x78), names.name(SVM, 0x78)) == ("120", "HLT")


@pytest.mark.parametrize("isa", [0, 3])
def test_unknown_isa_shows_the_number(names, isa):
    assert names.name(isa, 12) == "12"


#
# Cross-check against the kernel's uapi headers
#
def uapi_header(name):
    release = os.uname().release
    candidates = ["/lib/modules/%s/%s/arch/x86/include/uapi/asm/%s"
                  % (release, d, name) for d in ("source", "build")]
    candidates += sorted(glob.glob(
        "/usr/src/linux-headers-*/arch/x86/include/uapi/asm/" + name))
    for path in candidates:
        if os.path.exists(path):
            with open(path) as f:
                return f.read()
    raise AssertionError("no kernel headers with uapi asm/%s" % name)


def test_vmx_table_has_every_exit_reason_of_uapi_vmx_h():
    defines = re.findall(r"^#define EXIT_REASON_(\w+)\s+(\d+)\s*$",
                         uapi_header("vmx.h"), re.M)
    assert len(defines) > 60
    for name, code in defines:
        assert kvmexit.VMX_REASONS.get(int(code)) == name


def test_svm_table_has_every_exit_code_of_uapi_svm_h():
    defines = re.findall(r"^#define SVM_EXIT_(\w+)\s+(-?(?:0x)?[0-9a-f]+)"
                         r"\s*$", uapi_header("svm.h"), re.M)
    defines = [(n, int(c, 0) & 0xffffffff) for n, c in defines
               if n not in ("EXCP_BASE", "LAST_EXCP", "SW")]
    assert len(defines) > 90
    for name, code in defines:
        assert kvmexit.SVM_REASONS.get(code) == name


#
# The running kernel's tracepoint format
#
@pytest.fixture(scope="module")
def kernel_fmt():
    with open(FORMAT) as f:
        return f.read()


def test_format_of_this_kernel_lists_the_newer_vmx_codes(kernel_fmt):
    vmx, svm = kvmexit.parse_format_names(kernel_fmt)
    assert (vmx[84], vmx[85], vmx[77]) == ("MSR_READ_IMM", "MSR_WRITE_IMM",
                                          "TDCALL")
    assert len(vmx) == 65


def test_format_of_this_kernel_vmx_names_agree_with_the_static_table(
        kernel_fmt):
    vmx, _ = kvmexit.parse_format_names(kernel_fmt)
    assert {c: n for c, n in vmx.items() if c in kvmexit.VMX_REASONS} == \
        kvmexit.VMX_REASONS


def test_format_of_this_kernel_svm_names_are_normalised(kernel_fmt):
    _, svm = kvmexit.parse_format_names(kernel_fmt)
    assert svm[0x000] == "READ_CR0"
    assert svm[0x014] == "WRITE_CR4"
    assert svm[0x040] == "DE_EXCP"          # { 0x040 + 0, "DE excp" }
    assert svm[0x053] == "XF_EXCP"          # { 0x040 + 19, "XF excp" }
    assert svm[0x07b] == "IO"
    assert svm[0x0a6] == "IDLE_HALT"        # "idle-halt"
    assert svm[0x400] == "NPF"
    assert svm[0x80000001] == "VMGEXIT_MMIO_READ"
    assert svm[0x8000fffd] == "VMGEXIT_HYPERVISOR_FEATURE"
    assert svm[0xffffffff] == "INVALID_GUEST_STATE"     # { -1, ... }


def test_a_print_fmt_number_is_decimal_or_0x_hex_as_the_kernel_writes():
    # In a damaged format file, hex without 0x names nothing and a leading
    # zero is still decimal; nothing raises (int(text, 0) did).
    fmt = 'print fmt: "%s", __print_symbolic(REC->exit_reason, ' \
        '{ 10, "CPUID" }, { a1, "BAD" }, { 077, "ZERO" }, { 0x1e, "IO" }), ' \
        '__print_symbolic(REC->exit_reason, { -1, "ERR" }, { 0x40 + 2, ' \
        '"X" })'
    assert kvmexit.parse_format_names(fmt) == (
        {10: "CPUID", 77: "ZERO", 0x1e: "IO"}, {0xffffffff: "ERR", 0x42: "X"})
    arm = 'print fmt: "%s", __print_symbolic(REC->esr_ec, { 0x16, "HVC64" }' \
        ', { 1f, "BAD" }, { 01, "WFx" })'
    assert kvmexit.parse_arm64_format_names(arm) == {0x16: "HVC64", 1: "WFx"}


def test_format_svm_table_does_not_take_the_vmx_failed_entry_flag(
        kernel_fmt):
    """The fmt's __print_flags(... { 0x80000000, "FAILED_VMENTRY" }) after
    the SVM __print_symbolic() is a VMX flag, not an SVM exit code."""
    _, svm = kvmexit.parse_format_names(kernel_fmt)
    assert 0x80000000 not in svm
    names = kvmexit.ReasonNames(*kvmexit.parse_format_names(kernel_fmt))
    assert names.name(SVM, 0x80000000) == "0x80000000"


SMALL_FMT = r'''name: kvm_exit
ID: 103
format:
	field:unsigned int exit_reason;	offset:8;	size:4;	signed:0;

print fmt: "vcpu %u reason %s%s%s rip 0x%lx", REC->vcpu_id, (REC->isa == 1) ? __print_symbolic(REC->exit_reason & 0xffff, { 0, "EXCEPTION_NMI" }, { 12, "HLT" }, { 84, "MSR_READ_IMM" }) : __print_symbolic(REC->exit_reason, { 0x000, "read_cr0" }, { 0x040 + 14, "PF excp" }, { 0x0a6, "idle-halt" }, { 0x80000001, "vmgexit_mmio_read" }, { -1, "invalid_guest_state" }), (REC->isa == 1 && REC->exit_reason & ~0xffff) ? " " : "", (REC->isa == 1) ? __print_flags(REC->exit_reason & ~0xffff, " ", { 0x80000000, "FAILED_VMENTRY" }) : "", REC->guest_rip
'''

OLD_FMT = r'''print fmt: "reason %s rip 0x%lx info %llx %llx", (REC->isa == 1) ? __print_symbolic(REC->exit_reason, { 0, "EXCEPTION_NMI" }, { 30, "IO_INSTRUCTION" }) : __print_symbolic(REC->exit_reason, { 0x07b, "io" }, { 0x078, "hlt" }), REC->guest_rip, REC->info1, REC->info2
'''


def test_parse_format_names_of_a_small_fmt():
    assert kvmexit.parse_format_names(SMALL_FMT) == (
        {0: "EXCEPTION_NMI", 12: "HLT", 84: "MSR_READ_IMM"},
        {0x000: "READ_CR0", 0x04e: "PF_EXCP", 0x0a6: "IDLE_HALT",
         0x80000001: "VMGEXIT_MMIO_READ", 0xffffffff: "INVALID_GUEST_STATE"})


def test_parse_format_names_of_an_old_fmt_without_flags():
    assert kvmexit.parse_format_names(OLD_FMT) == (
        {0: "EXCEPTION_NMI", 30: "IO_INSTRUCTION"},
        {0x7b: "IO", 0x78: "HLT"})


def test_parse_format_names_without_symbolic_tables():
    assert kvmexit.parse_format_names('print fmt: "vcpu %u", REC->x') == \
        ({}, {})


def test_reason_names_keep_the_static_name_when_both_know_a_code():
    names = kvmexit.ReasonNames(*kvmexit.parse_format_names(SMALL_FMT))
    assert names.name(SVM, 0x000) == "READ_CR0"
    assert names.name(SVM, 0x04e) == "EXCP_PF"          # not PF_EXCP
    assert names.name(SVM, 0xffffffff) == "ERR"         # not INVALID_...
    assert names.name(VMX, 12) == "HLT"
    # ... and the kernel's name fills the gaps.
    assert names.name(VMX, 84) == "MSR_READ_IMM"
    assert names.name(SVM, 0x0a6) == "IDLE_HALT"
    assert names.name(SVM, 0x80000001) == "VMGEXIT_MMIO_READ"
    assert names.name(VMX, 0x80000054) == "MSR_READ_IMM|FAILED_VMENTRY"


def test_reason_names_of_this_kernel(kernel_fmt):
    names = kvmexit.kernel_reason_names(os.path.dirname(FORMAT))
    assert [names.name(VMX, 84), names.name(VMX, 85), names.name(VMX, 30),
            names.name(SVM, 0x7b), names.name(SVM, 0x60),
            names.name(SVM, 0xa5)] == [
        "MSR_READ_IMM", "MSR_WRITE_IMM", "IO_INSTRUCTION", "IOIO", "INTR",
        "BUSLOCK"]


def test_reason_names_without_a_tracepoint_are_the_static_ones(tmp_path):
    for tp_dir in (None, str(tmp_path)):
        names = kvmexit.kernel_reason_names(tp_dir)
        assert (names.name(VMX, 84), names.name(VMX, 30)) == (
            "84", "IO_INSTRUCTION")


#
# Counter slots
#
def test_vmx_layout():
    layout = kvmexit.VMX_LAYOUT
    assert (layout.slots, layout.words) == (96, 97)
    assert [layout.code(s) for s in (0, 30, 95)] == [0, 30, 95]
    assert layout.macros() == ["-DDIRECT_SLOTS=96", "-DHIGH_SLOTS=0"]


def test_svm_layout():
    layout = kvmexit.SVM_LAYOUT
    assert (layout.slots, layout.words) == (192, 193)
    assert [layout.code(s) for s in (0, 0x7b, 175, 176, 179, 191)] == \
        [0, 0x7b, 175, 0x400, 0x403, 0x40f]
    assert layout.macros() == ["-DDIRECT_SLOTS=176", "-DHIGH_SLOTS=16"]


def slot_codes(layout):
    return {layout.code(s) for s in range(layout.slots)}


def test_every_named_vmx_code_has_a_slot(kernel_fmt):
    vmx, _ = kvmexit.parse_format_names(kernel_fmt)
    assert set(kvmexit.VMX_REASONS) | set(vmx) <= slot_codes(
        kvmexit.VMX_LAYOUT)


def test_every_named_svm_exit_below_0x410_has_a_slot(kernel_fmt):
    _, svm = kvmexit.parse_format_names(kernel_fmt)
    named = {c for c in set(kvmexit.SVM_REASONS) | set(svm) if c < 0x410}
    assert named <= slot_codes(kvmexit.SVM_LAYOUT)


@pytest.mark.parametrize("modules,layout", [
    (["kvm", "kvm_intel"], "VMX"), (["kvm", "kvm_amd"], "SVM"),
    (["kvm"], "SVM"), ([], "SVM"), (["kvm_intel", "kvm_amd"], "SVM"),
])
def test_slot_layout_follows_the_vendor_module(tmp_path, modules, layout):
    for m in modules:
        (tmp_path / m).mkdir()
    assert kvmexit.slot_layout(str(tmp_path)) is getattr(
        kvmexit, layout + "_LAYOUT")


#
# CPU lists
#
@pytest.mark.parametrize("text,cpus", [
    ("0", [0]), ("0\n", [0]), ("0-1", [0, 1]), ("0-1\n", [0, 1]),
    ("0-3,8-11\n", [0, 1, 2, 3, 8, 9, 10, 11]), ("0,2,4-5", [0, 2, 4, 5]),
    ("7", [7]),
])
def test_parse_cpu_list(text, cpus):
    assert kvmexit.parse_cpu_list(text) == cpus


def test_parse_cpu_list_counts_eight_cpus():
    assert len(kvmexit.parse_cpu_list("0-3,8-11\n")) == 8


@pytest.mark.parametrize("text", [
    "", "\n", "abc", "-1", "0-", "-", "a-b", "3-1", "0,,1", "0-1\n2-3",
    "1-0x3", "0-3-5", "\x00", "\u0663", "0-65536", "70000"])
def test_what_is_not_a_cpu_list_is_an_error(text):
    with pytest.raises(kvmexit.Error) as e:
        kvmexit.parse_cpu_list(text)
    assert str(e.value) == "not a list of CPUs: %r" % text.strip()


def test_the_highest_cpu_a_list_may_name():
    assert kvmexit.parse_cpu_list("65535") == [65535]


def test_possible_cpus_matches_sys_devices_system_cpu_possible():
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    expected = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        expected += int(hi or lo) - int(lo) + 1
    assert kvmexit.possible_cpus() == expected
    assert expected >= len(os.sched_getaffinity(0))
