"""arm64 as a third ISA: what an exit of arm64's KVM counts as, its name,
its counter slot, the names the kernel's print fmt adds, and the arm64
program counting in this kernel.

arm64's kvm:kvm_exit(int ret, unsigned int esr_ec, unsigned long vcpu_pc)
has no exit_reason: an exit counts as (ret, ESR class of a trap).  The
format file in tests/formats is Debian's 6.1 arm64 kernel's, recorded in
the arm64 lab.  The arm64 raw program loads on this (x86) host too: its
raw arguments are plain numbers, so BPF_PROG_TEST_RUN runs it with the
(ret, esr_ec) we choose (tests/helpers/bpfrun.py).  The real arm64 exits
are counted in the arm64 lab (tests/lab/test_lab_arm64_kvmexit.py)."""

import io
import os

import pytest

import kvmexit
from helpers import print_report
from helpers import bpfrun

ARM64 = kvmexit.ISA_ARM64
FORMATS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "formats")
ARM64_FORMAT = os.path.join(FORMATS, "kvm_exit-6.1-arm64")
IRQ, SERROR, TRAP, IL, HYP_GONE = 0, 1, 2, 3, 0xbadca11
SERROR_PENDING = 1 << 31
DABT_LOW, HVC64, SYS64, WFX, IABT_LOW, SMC64 = 0x24, 0x16, 0x18, 0x01, \
    0x20, 0x17


def read(path):
    with open(path) as f:
        return f.read()


@pytest.fixture
def names():
    return kvmexit.ReasonNames()


def name_of(names, ret, ec):
    return names.name(ARM64, kvmexit.arm64_code(ret, ec))


#
# An exit's code and name
#
@pytest.mark.parametrize("ret,ec,name", [
    (TRAP, DABT_LOW, "DABT_LOW"), (TRAP, HVC64, "HVC64"),
    (TRAP, SYS64, "SYS64"), (TRAP, WFX, "WFx"), (TRAP, IABT_LOW, "IABT_LOW"),
    (TRAP, SMC64, "SMC64"), (TRAP, 0x00, "UNKNOWN"), (TRAP, 0x3c, "BRK64"),
    (TRAP, 0x2f, "SERROR"), (IRQ, 0, "IRQ"), (SERROR, 0, "SERROR"),
    (IL, 0, "IL"), (HYP_GONE, 0, "HYP_GONE"),
])
def test_a_trap_is_named_by_its_class_other_exits_by_their_kind(
        names, ret, ec, name):
    assert name_of(names, ret, ec) == name


@pytest.mark.parametrize("ret,ec,code", [
    (TRAP, DABT_LOW, 0x24), (TRAP, 0x3f, 63), (IRQ, 0, 64), (SERROR, 0, 65),
    (IL, 0, 67), (HYP_GONE, 0, 64 + 0xbadca11), (5, 0, 69),
])
def test_codes_traps_by_class_then_the_other_kinds_from_64(ret, ec, code):
    assert kvmexit.arm64_code(ret, ec) == code


@pytest.mark.parametrize("ec", [0, DABT_LOW, 0x3f])
def test_esr_class_of_an_exit_that_is_no_trap_is_ignored(ec):
    # The raw tracepoint passes the ESR class of every exit; the regular
    # one stores it for traps only, 0 otherwise.
    assert kvmexit.arm64_code(IRQ, ec) == kvmexit.arm64_code(IRQ, 0) == 64


@pytest.mark.parametrize("ret", [IRQ, TRAP, IL])
def test_a_pending_serror_bit_in_ret_is_masked_as_the_tracepoint_does(ret):
    # ret is an int: bit 31 makes it negative as the raw argument sees it.
    as_int = (ret | SERROR_PENDING) - (1 << 32)
    assert kvmexit.arm64_code(ret | SERROR_PENDING, HVC64) == \
        kvmexit.arm64_code(as_int, HVC64) == kvmexit.arm64_code(ret, HVC64)


@pytest.mark.parametrize("ret,ec,shown", [
    (TRAP, 0x02, "EC_0x02"), (TRAP, 0x3f, "EC_0x3f"), (TRAP, 0x3d, "EC_0x3d"),
    (4, 0, "RET_0x4"), (0x1234, 0, "RET_0x1234"), (TRAP, 0x0a, "EC_0x0a"),
])
def test_unknown_classes_and_kinds_show_as_hex_numbers(names, ret, ec,
                                                       shown):
    assert name_of(names, ret, ec) == shown


def test_isa_name_is_arm64():
    assert kvmexit.isa_name(ARM64) == "arm64"
    assert ARM64 not in (kvmexit.ISA_VMX, kvmexit.ISA_SVM) and ARM64 < 256


#
# Counter slots
#
def test_every_class_and_the_kinds_up_to_il_have_a_direct_slot():
    layout = kvmexit.ARM64_LAYOUT
    assert (layout.direct, layout.high, layout.slots, layout.words) == \
        (68, 0, 68, 69)
    codes = {layout.code(s) for s in range(layout.slots)}
    assert codes == set(range(68))
    assert {kvmexit.arm64_code(ret, 0) for ret in (IRQ, SERROR, IL)} | \
        set(kvmexit.ARM64_CLASSES) <= codes
    # HYP_GONE (the hypervisor went away) is counted exactly, as a rare
    # code.
    assert kvmexit.arm64_code(HYP_GONE, 0) not in codes


#
# The running kernel's format
#
def test_check_exit_fields_tells_arm64_from_x86(tmp_path):
    (tmp_path / "format").write_text(read(ARM64_FORMAT))
    assert kvmexit.check_exit_fields(str(tmp_path)) == "arm64"
    tp_dir = kvmexit.tracepoint_dir()
    assert kvmexit.check_exit_fields(tp_dir) == "x86"


def test_the_print_fmt_of_the_lab_kernel_names_these_codes():
    found = kvmexit.parse_arm64_format_names(read(ARM64_FORMAT))
    # 4 kinds of exit but TRAP (which counts as its class), 34 classes.
    assert {c: n for c, n in found.items() if c >= 64} == {
        64: "IRQ", 65: "SERROR", 64 + 0xbadca11: "HYP_GONE"}
    assert len([c for c in found if c < 64]) == 34
    assert (found[0x00], found[0x01], found[0x16], found[0x18], found[0x20],
            found[0x24], found[0x3c]) == ("UNKNOWN", "WFx", "HVC64",
                                          "SYS64", "IABT_LOW", "DABT_LOW",
                                          "BRK64")
    # The kernel's names are the static table's, spelled the same.
    assert all(kvmexit.ARM64_REASONS[c] == n for c, n in found.items())


def test_classes_only_the_kernel_names_are_named_and_static_names_win(
        tmp_path):
    fmt = read(ARM64_FORMAT).replace(
        '{ (0x3C), "BRK64" }',
        '{ (0x3C), "BREAKPOINT64" }, { (0x3D), "NEW_CLASS" }').replace(
        '{0xbadca11, "HYP_GONE" }',
        '{0xbadca11, "HYP_GONE" }, {9, "NEW KIND" }')
    (tmp_path / "format").write_text(fmt)
    names = kvmexit.kernel_reason_names(str(tmp_path))
    assert name_of(names, TRAP, 0x3d) == "NEW_CLASS"
    assert name_of(names, 9, 0) == "NEW_KIND"
    assert name_of(names, TRAP, 0x3c) == "BRK64"
    assert name_of(names, TRAP, 0x3e) == "EC_0x3e"
    # x86's tables are not touched by an arm64 format.
    assert names.name(kvmexit.ISA_SVM, 0x7b) == "IOIO"


def test_an_x86_format_names_no_arm64_code():
    fmt = 'print fmt: "reason %s", __print_symbolic(REC->exit_reason, ' \
          '{ 0, "EXCEPTION_NMI" }, { 1, "EXTERNAL_INTERRUPT" })'
    assert kvmexit.parse_arm64_format_names(fmt) == {}


#
# Which probe
#
@pytest.fixture
def arm64_tp(tmp_path):
    (tmp_path / "format").write_text(read(ARM64_FORMAT))
    return str(tmp_path)


@pytest.mark.parametrize("requested,kind,fallback", [
    ("auto", "raw-arm64", "tracepoint"), ("raw", "raw-arm64", None),
    ("tracepoint", "tracepoint", None)])
def test_raw_is_the_default_on_arm64_with_the_tracepoint_to_fall_back_on(
        arm64_tp, requested, kind, fallback):
    probe = kvmexit.choose_probe(requested, arm64_tp, kvm="arm64")
    assert probe.kind == kind
    assert (probe.fallback and probe.fallback.kind) == fallback
    assert not probe.sees_vcpu_ids
    assert "-DKVM_ARM64" in probe.macros()
    assert probe.fallback is None or \
        "-DKVM_ARM64" in probe.fallback.macros()


def test_detail_on_arm64_takes_the_raw_probe(arm64_tp):
    # Its sub-keys all come from other events (tests/test_detail_arm64.py).
    probe = kvmexit.choose_probe("auto", arm64_tp, detail=True, kvm="arm64")
    assert probe.kind == "raw-arm64"


#
# The arm64 program in this kernel
#
RAW_ARM64 = kvmexit.Probe("raw-arm64", "test", kvm="arm64")
ALL = kvmexit.Selection("all threads", "all")


@pytest.fixture(scope="module")
def arm64_prog(bcc, cpus_0_1):
    program = kvmexit.Program(RAW_ARM64, ALL, 64, kvmexit.ARM64_LAYOUT)
    b = kvmexit.load_program(program)
    fd = b.load_func(b"raw_kvm_exit", bcc.BPF.RAW_TRACEPOINT).fd
    yield program, b, fd
    b.cleanup()


GUEST_PC = 0x40001000           # kvm_exit's third argument, not read


def raw_int(value):
    """An int argument as the raw tracepoint passes it: sign-extended."""
    return (value - (1 << 32) if value & 1 << 31 else value) & (1 << 64) - 1


def fire(prog_fd, cpu, exits):
    """exits: [(ret, esr_ec, times)] as raw kvm_exit(ret, esr_ec, pc)
    events from a new thread on `cpu`; returns its tid."""
    def run(tid):
        for ret, ec, times in exits:
            for _ in range(times):
                bpfrun.test_run(prog_fd, [raw_int(ret), ec, GUEST_PC])
        return tid
    return bpfrun.in_thread(cpu, run)


def test_the_raw_program_counts_each_class_and_kind_exactly(arm64_prog):
    program, b, fd = arm64_prog
    tid = fire(fd, 0, [(TRAP, DABT_LOW, 11), (TRAP, HVC64, 5),
                       (TRAP, SYS64, 3), (TRAP, IABT_LOW, 1),
                       (IRQ, HVC64, 4), (TRAP | SERROR_PENDING, WFX, 2),
                       (IRQ | SERROR_PENDING, 0, 1), (HYP_GONE, 0, 1),
                       (TRAP, 0x3d, 1), (7, 0, 1)])
    snap = kvmexit.snapshot(b, program, kvmexit.possible_cpus())
    pid = os.getpid()
    mine = {code: n for (tgid, t, isa, code), n in snap.counts.items()
            if (tgid, t, isa) == (pid, tid, ARM64)}
    names = kvmexit.ReasonNames()
    assert {names.name(ARM64, c): n for c, n in mine.items()} == {
        "DABT_LOW": 11, "HVC64": 5, "SYS64": 3, "IABT_LOW": 1, "IRQ": 5,
        "WFx": 2, "HYP_GONE": 1, "EC_0x3d": 1, "RET_0x7": 1}
    assert snap.lost == [0] * len(kvmexit.LOST)

    out = io.StringIO()
    tid_only = kvmexit.Selection("TID %d" % tid, "tid", tids=[tid])
    print_report(tid_only, snap, names, out=out)
    assert out.getvalue().splitlines() == [
        "KVM_EXIT_REASON                     COUNT",
        "DABT_LOW                            11      ",
        "HVC64                               5       ",
        "IRQ                                 5       ",
        "SYS64                               3       ",
        "WFx                                 2       ",
        "IABT_LOW                            1       ",
        "EC_0x3d                             1       ",
        "RET_0x7                             1       ",
        "HYP_GONE                            1       "]
