"""arm64_guest.py's programs without a VM: machine code, expectations, bad
input.

    /usr/bin/python3 -m pytest -v tests/lab/test_arm64_guest_program.py

No root, no KVM, no arm64: what an arm64 lab guest will execute and promise
is fixed before it runs, so it is checked here, fast.  The arm64 lab (see
README, "The arm64 lab") showed KVM and the kernel's tracepoints agree.
"""

import os
import subprocess
import sys

import pytest

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, LAB_DIR)
import arm64_guest  # noqa: E402

GUEST = os.path.join(LAB_DIR, "arm64_guest.py")


def program(*texts, page=0x1000):
    return arm64_guest.Program(
        [arm64_guest.parse_step(t)[1] for t in texts], page)


# Little-endian words as GNU as 2.40 (aarch64) assembles them; a step
# being "mov x9, COUNT; SETUP; BODY; subs x9, x9, #1; b.ne BODY".
LOOP_END = "290500f1"                       # subs x9, x9, #1
CODE = {
    # mov x10, #0; movk x10, #0x1000, lsl #16; str w11, [x10]
    "mmio-write:0x10000000/4:3": "690080d2" "0a0080d2" "0a00a2f2"
                                 "4b0100b9" + LOOP_END + "c1ffff54",
    # ldr x11, [x10]
    "mmio-read:0x10001008/8:2": "490080d2" "0a0182d2" "0a00a2f2"
                                "4b0140f9" + LOOP_END + "c1ffff54",
    # strb w11, [x10]
    "mmio-write:0x10000000/1:1": "290080d2" "0a0080d2" "0a00a2f2"
                                 "4b010039" + LOOP_END + "c1ffff54",
    # mov x0, #0; movk x0, #0x8400, lsl #16; hvc #0
    "hvc:0x84000000:5": "a90080d2" "000080d2" "0080b0f2" "020000d4" +
                        LOOP_END + "81ffff54",
    # mov x0, #1; movk x0, #0xc600, lsl #16; smc #0
    "smc:0xc6000001:1": "290080d2" "200080d2" "00c0b8f2" "030000d4" +
                        LOOP_END + "81ffff54",
    "wfi:4": "890080d2" "7f2003d5" + LOOP_END + "c1ffff54",
    "mrs:ID_AA64PFR0_EL1:3": "690080d2" "0b0438d5" + LOOP_END + "c1ffff54",
    "mrs:OSLSR_EL1:1": "290080d2" "8b1130d5" + LOOP_END + "c1ffff54",
    "mrs:MDRAR_EL1:1": "290080d2" "0b1030d5" + LOOP_END + "c1ffff54",
    "mrs:ACTLR_EL1:1": "290080d2" "2b1038d5" + LOOP_END + "c1ffff54",
}
# mov x10, #0xf000; movk x10, #0xfff, lsl #16; str w11, [x10]; b .
DONE = "0a009ed2" "eaffa1f2" "4b0100b9" "00000014"


@pytest.mark.parametrize("text", sorted(CODE))
def test_step_machine_code(text):
    assert program(text).code().hex() == CODE[text] + DONE


def test_expected_events_of_a_program():
    prog = program("mmio-write:0x10000000/4:11", "hvc:0x84000000:5",
                   "wfi:4", "mrs:OSLSR_EL1:2", "smc:7:1",
                   "mmio-read:0x10001000/8:3", page=0x2000)
    trap = arm64_guest.RET["TRAP"]
    assert prog.expected() == {
        "kvm_exit": [
            {"ret": trap, "esr_ec": 0x20, "count": 1},      # IABT_LOW
            {"ret": trap, "esr_ec": 0x24, "count": 11 + 3 + 1},
            {"ret": trap, "esr_ec": 0x16, "count": 5},      # HVC64
            {"ret": trap, "esr_ec": 0x01, "count": 4},      # WFx
            {"ret": trap, "esr_ec": 0x18, "count": 2},      # SYS64
            {"ret": trap, "esr_ec": 0x17, "count": 1}],     # SMC64
        "kvm_guest_fault": [{"ipa": 0x2000, "count": 1},
                            {"ipa": 0x10000000, "count": 11},
                            {"ipa": 0x10001000, "count": 3},
                            {"ipa": 0x0ffff000, "count": 1}],
        "kvm_hvc_arm64": [{"imm": 0, "r0": 0x84000000, "count": 5}],
        "kvm_mmio": [
            {"gpa": 0x10000000, "len": 4, "type": 2, "count": 11},
            {"gpa": 0x10001000, "len": 8, "type": 0, "count": 3},
            {"gpa": 0x10001000, "len": 8, "type": 1, "count": 3},
            {"gpa": 0x0ffff000, "len": 4, "type": 2, "count": 1}],
        "kvm_sys_access": [{"CRm": 1, "CRn": 1, "Op0": 2, "Op1": 0,
                            "Op2": 4, "is_write": 0, "count": 2}],
        "kvm_userspace_exit": [{"reason": 6, "count": 11 + 3 + 1}],
        "kvm_wfx_arm64": [{"is_wfe": 0, "count": 4}]}
    assert prog.user_detail() == {"mmio-write:0x10000000/4": 11,
                                  "mmio-read:0x10001000/8": 3}


def test_vcpus_get_their_own_code_page():
    args = arm64_guest.parse_args(["--do", "1@wfi:2", "--do", "hvc:0:1"])
    assert args.vcpus == 2
    assert [p.code_page for p in args.programs] == [0x0, 0x1000]
    assert [[s.text for s in p.steps] for p in args.programs] == \
        [["hvc:0"], ["wfi", "hvc:0"]]


def test_vector_table_ends_the_vcpu_with_a_report():
    table = arm64_guest.vector_table()
    # mov x10, #0xe000; movk x10, #0xfff, lsl #16; str w11, [x10]; b .
    entry = bytes.fromhex("0a009cd2" "eaffa1f2" "4b0100b9" "00000014")
    assert len(table) == 16 * 0x80
    for i in range(16):
        assert table[i * 0x80:(i + 1) * 0x80] == entry.ljust(0x80, b"\0")


@pytest.mark.parametrize("step, message", [
    ("hvc:0x84000008:1", "function 0x84000008 (PSCI_SYSTEM_OFF) makes KVM "
                         "act; choose another id"),
    ("smc:0x84000002:1", "function 0x84000002 (PSCI_CPU_OFF) makes KVM act; "
                         "choose another id"),
    ("mmio-write:0x8000/4:1", "IPA 0x8000 is in guest RAM (below 0x10000)"),
    ("mmio-read:0x10000002/4:1", "IPA 0x10000002 is not 4-byte aligned "
                                 "(device memory: the MMU is off)"),
    ("mmio-write:0x0ffff000/4:1", "pages 0xffff000 and 0xfffe000 end "
                                  "programs"),
    ("mmio-write:0x10000000/3:1", "size 3 is not 1, 2, 4 or 8"),
    ("mrs:MIDR_EL1:1", "register 'MIDR_EL1': one of ID_AA64PFR0_EL1, "
                       "ID_AA64ISAR0_EL1, ID_AA64MMFR0_EL1, ACTLR_EL1, "
                       "MDRAR_EL1, OSLSR_EL1"),
    ("wfi:x:1", "wfi takes no key: wfi:COUNT"),
    ("wfe:1", "unknown kind 'wfe' (one of mmio-write, mmio-read, hvc, smc, "
              "wfi, mrs)"),
])
def test_bad_steps_refused(step, message):
    with pytest.raises(ValueError) as e:
        arm64_guest.parse_step(step)
    assert str(e.value) == message


def test_bad_command_line_is_one_usage_error():
    result = subprocess.run([sys.executable, GUEST, "--do", "3@wfi:1",
                             "--vcpus", "2"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == \
        "arm64_guest.py: error: --do wfi: no vCPU 3 (2 vCPUs)"
