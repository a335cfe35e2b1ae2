"""guest.py's programs without a VM: machine code, expectations, bad input.

    /usr/bin/python3 -m pytest -v tests/lab/test_guest_program.py

No root, no KVM: what a lab guest will execute and promise is fixed before
it runs, so it is checked here, fast.  (test_lab_guest.py proves in the lab
that KVM and the kernel's tracepoints agree with it.)
"""

import os
import subprocess
import sys

import pytest

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, LAB_DIR)
import guest  # noqa: E402

GUEST = os.path.join(LAB_DIR, "guest.py")


def program(*texts):
    return guest.Program([guest.parse_step(t)[1] for t in texts])


class NoVcpu:
    """Stands in for the vCPU whose MSR a wrmsr without value writes back."""

    def read_msr(self, index):
        return 0xfee00900


# Bytes as GNU as 2.40 (.code16) assembles the same lines (it puts 0x67
# before 0x66, the same instruction); a step is
# "mov ebp, COUNT; SETUP; BODY; dec ebp; jnz BODY".
CODE = {
    "out:0x70/2:3": "66bd03000000" "ba7000" "ef" "664d" "75fb",
    "in:0x1234/4:1": "66bd01000000" "ba3412" "66ed" "664d" "75fa",
    "mmio-write:0xd0000010/4:2":
        "66bd02000000" "6667a3100000d0" "664d" "75f5",
    "mmio-read:0xe0000000/1:5": "66bd05000000" "67a0000000e0" "664d" "75f6",
    "rdmsr:0x1b:7": "66bd07000000" "66b91b000000" "0f32" "664d" "75fa",
    "wrmsr:0x1b:1": "66bd01000000" "66b91b000000" "66b80009e0fe"
                    "66ba00000000" "0f30" "664d" "75fa",
    "cpuid:0x80000001:2": "66bd02000000" "66b801000080" "66b900000000"
                          "0fa2" "664d" "75ee",
    "exc:6:4": "66bd04000000" "0f0b" "664d" "75fa",
    "cr4:9": "66bd09000000" "0f20e0" "0f22e0" "664d" "75f6",
}


@pytest.mark.parametrize("text", sorted(CODE))
def test_step_machine_code(text):
    code = program(text).code("svm", NoVcpu())
    assert code.hex() == CODE[text] + "f4"      # then hlt


def test_cr4_step_flips_mce_on_vmx_only():
    """VMX exits only on a write that changes a bit KVM owns; SVM on
    every read and write, so there the value is written back as read."""
    body = "66bd03000000" "0f20e0" "{}" "0f22e0" "664d" "75{}" "f4"
    assert program("cr4:3").code("vmx", None).hex() == \
        body.format("3440", "f4")
    assert program("cr4:3").code("svm", None).hex() == body.format("", "f6")
    assert program("cr4:3").expected("vmx")["kvm_exit"] == [
        {"exit_reason": 28, "count": 3}, {"exit_reason": 12, "count": 1}]


def test_hypercall_is_the_vendors_instruction():
    body = "66bd02000000" "66b800010000" "{}" "664d" "75f3" "f4"
    assert program("hypercall:0x100:2").code("svm", None).hex() == \
        body.format("0f01d9")
    assert program("hypercall:0x100:2").code("vmx", None).hex() == \
        body.format("0f01c1")


def test_zero_count_steps_vanish():
    assert program("out:0x70:0", "cpuid:1:0").code("svm", None) == b"\xf4"


def test_mmio_first_access_per_page_on_vmx():
    """Two keys in one page: only the first access of all takes the EPT
    violation (seen in kvm_page_fault); the rest are EPT misconfigs."""
    e = program("mmio-write:0xd0000000/1:3", "mmio-read:0xd0000ff0/2:4",
                "mmio-write:0xd0001000/4:2").expected("vmx")
    assert e["kvm_page_fault"] == [
        {"fault_address": 0xd0000000, "count": 1},
        {"fault_address": 0xd0001000, "count": 1}]
    assert {"exit_reason": 49, "count": 2 + 4 + 1} in e["kvm_exit"]
    assert e["kvm_mmio"] == [
        {"gpa": 0xd0000000, "type": 2, "count": 3},
        {"gpa": 0xd0000ff0, "type": 0, "count": 4},
        {"gpa": 0xd0000ff0, "type": 1, "count": 4},
        {"gpa": 0xd0001000, "type": 2, "count": 2}]


def test_svm_expectations_per_kind():
    e = program("in:0x71/2:5", "wrmsr:0x6e0:3", "rdmsr:0x4b4d0000:2",
                "exc:6:4", "cr4:1").expected("svm")
    assert e["kvm_exit"] == [
        {"exit_reason": 0x7b, "info1": 0x710021, "count": 5},
        {"exit_reason": 0x7c, "info1": 1, "count": 3},
        {"exit_reason": 0x7c, "info1": 0, "count": 2},
        {"exit_reason": 0x46, "count": 4},
        {"exit_reason": 0x04, "count": 1},
        {"exit_reason": 0x14, "count": 1},
        {"exit_reason": 0x78, "count": 1}]
    assert e["kvm_msr"] == [{"ecx": 0x6e0, "write": 1, "count": 3}]
    assert e["kvm_userspace_exit"] == [
        {"reason": 2, "count": 5}, {"reason": 29, "count": 2},
        {"reason": 5, "count": 1}]
    assert e["kvm_inj_exception"] == [
        {"exception": 6, "reinjected": 0, "count": 4}]


@pytest.mark.parametrize("args, message", [
    (["--do", "bogus:1"], "unknown kind 'bogus'"),
    (["--do", "out:0x70/3:1"], "size 3 is not 1, 2 or 4"),
    (["--do", "out:0x10000:1"], "port 0x10000 does not fit in 16 bits"),
    (["--do", "hypercall:5:1"], "hypercall 5 (KICK_CPU) makes KVM act"),
    (["--do", "exc:13:1"], "vector 13: only [1, 3, 6] are intercepted"),
    (["--do", "mmio-write:0x8000:1"], "address 0x8000 is in guest RAM"),
    (["--do", "mmio-read:0xd0000fff/2:1"], "crosses a page"),
    (["--do", "rdmsr:0x1b=5:1"], "only wrmsr takes a value"),
    (["--do", "cpuid:1:"], "has no COUNT"),
    (["--do", "cpuid:5"], "cpuid needs a key: cpuid:KEY:COUNT"),
    (["--vcpus", "2", "--do", "2@cpuid:1:1"], "no vCPU 2 (2 vCPUs)"),
    (["--do", "0@mmio-write:0xd0000000:1", "--do",
      "1@mmio-read:0xd0000008:1"], "MMIO page 0xd0000000 is used by vCPUs"),
    (["--seconds", "1", "--do", "cpuid:1:1"], "--do needs counted mode"),
])
def test_bad_programs_are_refused_before_any_vm(args, message):
    proc = subprocess.run([sys.executable, GUEST] + args, text=True,
                          capture_output=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("guest.py: error: ") and message in last, last
    assert "Traceback" not in proc.stderr
