#!/usr/bin/python3
"""Tiny arm64 KVM guests with exactly known VM exits, for testing kvmexit.

The arm64 sibling of tests/lab/guest.py, with the same interface (--do,
--report, --hold, --thread-name) and report layout.  Stdlib only: it drives
/dev/kvm with raw ioctls, so it runs in the arm64 lab under /usr/bin/python3
with nothing else installed.  It makes one VM with one thread per vCPU,
named like QEMU's "CPU <n>/KVM".  The VM has no in-kernel interrupt
controller.  Each vCPU runs its own AArch64 program at EL1, MMU off,
interrupts masked, from its own page of guest RAM: a list of steps "do KIND
(on KEY) COUNT times", then one write to DONE_ADDR, which ends it.

    --do [VCPUS@]KIND[:KEY]:COUNT   (repeatable, in order; VCPUS limits a
                                     step to some vCPUs, e.g. "0,2@wfi:5")
        mmio-write:IPA[/SIZE]  str to an IPA outside guest RAM (SIZE 1, 2,
                               4, 8): a stage-2 data abort, DABT_LOW, that
                               KVM hands to user space as KVM_EXIT_MMIO
        mmio-read:IPA[/SIZE]   ldr from it: the same, user space answers 0
        hvc:FUNCTION_ID        hvc #0 with x0 = FUNCTION_ID: HVC64, which
                               KVM answers itself (PSCI, SMCCC; -1 for ids
                               it does not know); ids that make KVM act on
                               the VM (CPU_OFF, SYSTEM_OFF...) are refused
        smc:FUNCTION_ID        smc #0: SMC64, KVM answers -1 (6.1)
        wfi                    wfi: WFx.  Nothing is ever pending (no
                               irqchip, timers off), so each one traps, and
                               KVM waits in kvm_vcpu_block until a signal:
                               a waker thread sends SIGUSR1 to a vCPU thread
                               it sees waiting there, so each WFI also ends
                               in one KVM_EXIT_INTR ("wakeups" in the
                               report counts the signals; one that came
                               late would add an IRQ exit and an INTR).
                               A pending interrupt would make WFI not trap
                               at all, and 6.1 does not wake a WFI for a
                               fired timer without an irqchip that takes
                               its line.
        mrs:REGISTER           mrs x11, REGISTER, one of SYSREGS: a trapped
                               system register read, SYS64, that KVM
                               emulates
    done                       str to DONE_ADDR -> DABT_LOW, KVM_EXIT_MMIO

Each vCPU's first instruction fetch from its code page is a stage-2
instruction abort, IABT_LOW, that KVM handles (it maps the page).

The report has, per vCPU, what the kernel's tracepoints must count for its
thread: "expected_events" {tracepoint: [{field: value, ..., "count": n}]}
for kvm_exit (ret, esr_ec), kvm_wfx_arm64, kvm_hvc_arm64, kvm_sys_access,
kvm_guest_fault, kvm_mmio and kvm_userspace_exit; an entry names only the
fields it fixes.  Expect noise on top: kvm_exit with ret 0 (IRQ) whenever a
host interrupt arrives while the vCPU runs.

Usage (as root, where /dev/kvm is an arm64 KVM):

    arm64_guest.py --do mmio-write:0x10000000/4:11 --do hvc:0x84000000:5 \\
        --do mrs:ID_AA64PFR0_EL1:3 --do 1@wfi:4 --vcpus 3 \\
        --report r.json --hold go
        Writes r.json once all vCPU threads exist (state "ready": pid, and
        per vCPU its tid, comm and expected events), waits until the file
        "go" exists (a FIFO: one byte; "-": a line on stdin), runs, rewrites
        r.json (state "done") with what user space saw per vCPU, and exits
        0 if every vCPU reached its end after exactly the user-space exits
        its program makes.

Run it several times for several VMs (processes).
"""

import argparse
import ctypes
import functools
import mmap
import os
import signal
import struct
import sys
import threading
import time
from fcntl import ioctl  # mutates ctypes structures in place

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
# What is the same on every ISA: the generic KVM ioctls and run page, steps,
# the report, the vCPU threads' start.
from guest import (KVM_CREATE_VCPU, KVM_EXIT_INTR,  # noqa: E402
                   KVM_EXIT_MMIO, KVM_RUN, KVM_RUN_EXIT_REASON, KVM_RUN_MMIO,
                   KVM_RUN_UNION, U32, Expect, Steps, VcpuRunner,
                   _ioc, add_report_options, announce_ready,
                   check_do_vcpus, do_step, join_all, open_vm, parse_number,
                   print_problems, write_report)
from guest import parse_step as parse_step_of  # noqa: E402

# --- KVM's user ABI (arm64), from arch/arm64/include/uapi/asm/kvm.h ---------


class KvmVcpuInit(ctypes.Structure):
    _fields_ = [("target", ctypes.c_uint32),
                ("features", ctypes.c_uint32 * 7)]


class KvmOneReg(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("addr", ctypes.c_uint64)]


assert ctypes.sizeof(KvmVcpuInit) == 32 and ctypes.sizeof(KvmOneReg) == 16

KVM_GET_ONE_REG = _ioc(1, 0xab, ctypes.sizeof(KvmOneReg))
KVM_SET_ONE_REG = _ioc(1, 0xac, ctypes.sizeof(KvmOneReg))
KVM_ARM_VCPU_INIT = _ioc(1, 0xae, ctypes.sizeof(KvmVcpuInit))
KVM_ARM_PREFERRED_TARGET = _ioc(2, 0xaf, ctypes.sizeof(KvmVcpuInit))

# PSCI 0.2 and later (KVM answers PSCI_VERSION, SMCCC_VERSION...).
KVM_ARM_VCPU_PSCI_0_2 = 2

# Register ids: core registers by their u32 offset in struct kvm_regs
# (x0..x30, sp, pc, pstate), system registers by Op0, Op1, CRn, CRm, Op2.
KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_ARM_CORE = 0x0010 << 16
KVM_REG_ARM64_SYSREG = 0x0013 << 16


def core_reg(index):
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | index * 2


def sys_reg(op0, op1, crn, crm, op2):
    return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG |
            op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2)


REG_PC = core_reg(32)
REG_PSTATE = core_reg(33)
# EL1h with D, A, I and F masked: what VCPU_INIT sets, spelled out.
PSTATE_EL1H_MASKED = 0x3c5
REG_VBAR_EL1 = sys_reg(3, 0, 12, 0, 0)
# What an exception the guest took left, for the report.
FAULT_REGS = {"ESR_EL1": sys_reg(3, 0, 5, 2, 0),
              "ELR_EL1": sys_reg(3, 0, 4, 0, 1),
              "FAR_EL1": sys_reg(3, 0, 6, 0, 0)}

KVM_EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 6: "MMIO", 8: "SHUTDOWN",
                  9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR",
                  24: "SYSTEM_EVENT", 34: "ARM_NISV"}

# kvm:kvm_exit's `ret` (arch/arm64/include/asm/kvm_asm.h) and `esr_ec`
# (arch/arm64/include/asm/esr.h) for the exits these guests make.
RET = {"IRQ": 0, "SERROR": 1, "TRAP": 2}
EC = {"WFx": 0x01, "HVC64": 0x16, "SMC64": 0x17, "SYS64": 0x18,
      "IABT_LOW": 0x20, "DABT_LOW": 0x24}
# kvm_mmio's type (include/trace/events/kvm.h).
MMIO_READ_UNSATISFIED, MMIO_READ, MMIO_WRITE = 0, 1, 2

# --- the guest's memory ------------------------------------------------------

PAGE = 0x1000
RAM_BASE = 0x0                  # vCPU i's code is at RAM_BASE + i * PAGE
RAM_SIZE = 16 * PAGE            # 64 KiB: whole pages for 4K and 64K kernels
MAX_VCPUS = 15
VECTORS = RAM_BASE + MAX_VCPUS * PAGE   # the last page: VBAR_EL1
MMIO_LIMIT = 1 << 32            # IPAs of mmio steps stay below this
DONE_ADDR = 0x0ffff000          # the end of every program; not for steps
FAULT_ADDR = 0x0fffe000         # written by the exception vectors

# --- AArch64 machine code ----------------------------------------------------

# Registers: x0 the SMCCC function id (x0-x3 are its results), x9 the loop
# counter, x10 an address, x11 data.
X0, X9, X10, X11 = 0, 9, 10, 11


def movz(rd, imm16, shift):
    return 0xd2800000 | (shift // 16) << 21 | imm16 << 5 | rd


def movk(rd, imm16, shift):
    return 0xf2800000 | (shift // 16) << 21 | imm16 << 5 | rd


def mov_imm(rd, value):
    """movz + movk for each further non-zero 16-bit part of a u64."""
    words = [movz(rd, value & 0xffff, 0)]
    for shift in (16, 32, 48):
        part = value >> shift & 0xffff
        if part:
            words.append(movk(rd, part, shift))
    return words


# ldr/str Rt, [Rn] by access size (the opc/size bits; 8 uses x registers).
STR = {1: 0x39000000, 2: 0x79000000, 4: 0xb9000000, 8: 0xf9000000}
LDR = {1: 0x39400000, 2: 0x79400000, 4: 0xb9400000, 8: 0xf9400000}


def store(size, rt, rn):
    return STR[size] | rn << 5 | rt


def load(size, rt, rn):
    return LDR[size] | rn << 5 | rt


def hvc(imm16):
    return 0xd4000002 | imm16 << 5


def smc(imm16):
    return 0xd4000003 | imm16 << 5


WFI = 0xd503207f


def mrs(rt, op0, op1, crn, crm, op2):
    return (0xd5200000 | op0 << 19 | op1 << 16 | crn << 12 | crm << 8 |
            op2 << 5 | rt)


def subs_one(rd):
    return 0xf1000400 | rd << 5 | rd          # subs xd, xd, #1


def b_ne(offset_words):
    return 0x54000001 | (offset_words & 0x7ffff) << 5


def b_self():
    return 0x14000000                          # b .


def words_to_bytes(words):
    return b"".join(struct.pack("<I", w) for w in words)


def vector_table():
    """VBAR_EL1's 16 entries of 0x80 bytes, each a write to FAULT_ADDR: an
    exception KVM injects into the guest (an UNDEF for a register it does
    not emulate, say) then ends the vCPU with a report, instead of running
    whatever code lies at address 0 + offset."""
    entry = words_to_bytes(mov_imm(X10, FAULT_ADDR) +
                           [store(4, X11, X10), b_self()])
    return b"".join(entry.ljust(0x80, b"\0") for _ in range(16))


# --- the steps a vCPU can take, as data -------------------------------------

# System registers whose reads KVM 6.1 traps on every access (the trap bit
# it sets) and emulates without side effects: Op0, Op1, CRn, CRm, Op2.
SYSREGS = {
    "ID_AA64PFR0_EL1": ((3, 0, 0, 4, 0), "HCR_EL2.TID3"),
    "ID_AA64ISAR0_EL1": ((3, 0, 0, 6, 0), "HCR_EL2.TID3"),
    "ID_AA64MMFR0_EL1": ((3, 0, 0, 7, 0), "HCR_EL2.TID3"),
    "ACTLR_EL1": ((3, 0, 1, 0, 1), "HCR_EL2.TACR"),
    "MDRAR_EL1": ((2, 0, 1, 0, 0), "MDCR_EL2.TDRA"),
    "OSLSR_EL1": ((2, 0, 1, 1, 4), "MDCR_EL2.TDOSA"),
}

# SMCCC/PSCI function ids that make KVM act on the VM or the vCPU (power a
# vCPU on or off, suspend it, end or reset the VM): a test guest must only
# make KVM count and answer.  32- and 64-bit calling conventions.
ACTING_FUNCTIONS = {
    0x84000001: "PSCI_CPU_SUSPEND", 0xc4000001: "PSCI_CPU_SUSPEND",
    0x84000002: "PSCI_CPU_OFF",
    0x84000003: "PSCI_CPU_ON", 0xc4000003: "PSCI_CPU_ON",
    0x84000005: "PSCI_MIGRATE", 0xc4000005: "PSCI_MIGRATE",
    0x84000008: "PSCI_SYSTEM_OFF", 0x84000009: "PSCI_SYSTEM_RESET",
    0x8400000e: "PSCI_SYSTEM_SUSPEND", 0xc400000e: "PSCI_SYSTEM_SUSPEND",
    0x84000012: "PSCI_SYSTEM_RESET2", 0xc4000012: "PSCI_SYSTEM_RESET2",
}


def parse_sized(text, what):
    """'IPA[/SIZE]' -> (IPA, SIZE); SIZE 1, 2, 4 or 8, default 4."""
    where, _, size = text.partition("/")
    size = parse_number(size or "4", 8, "size")
    if size not in STR:
        raise ValueError(f"size {size} is not 1, 2, 4 or 8")
    return parse_number(where, 64, what), size


class Mmio:
    """Accesses outside guest RAM: KVM exits to user space every time (no
    mapping is ever made for an IPA outside every memory slot)."""

    needs_key = True

    def __init__(self, write):
        self.write = write

    def parse(self, key):
        ipa, size = parse_sized(key, "IPA")
        if ipa < RAM_BASE + RAM_SIZE:
            raise ValueError(f"IPA {ipa:#x} is in guest RAM (below "
                             f"{RAM_BASE + RAM_SIZE:#x})")
        if ipa + size > MMIO_LIMIT:
            raise ValueError(f"IPA {ipa:#x} + {size} passes 4 GiB")
        if ipa % size:
            raise ValueError(f"IPA {ipa:#x} is not {size}-byte aligned "
                             "(device memory: the MMU is off)")
        if ipa // PAGE in (DONE_ADDR // PAGE, FAULT_ADDR // PAGE):
            raise ValueError(f"pages {DONE_ADDR:#x} and {FAULT_ADDR:#x} "
                             "end programs")
        return {"ipa": ipa, "size": size}

    def code(self, key):
        access = store if self.write else load
        return mov_imm(X10, key["ipa"]), [access(key["size"], X11, X10)]

    def expect(self, key, n, e):
        ipa = key["ipa"]
        e.add("kvm_exit", n, ret=RET["TRAP"], esr_ec=EC["DABT_LOW"])
        e.add("kvm_guest_fault", n, ipa=ipa)
        if self.write:
            e.add("kvm_mmio", n, type=MMIO_WRITE, len=key["size"], gpa=ipa)
        else:       # traced when it leaves (unsatisfied) and when completed
            e.add("kvm_mmio", n, type=MMIO_READ_UNSATISFIED,
                  len=key["size"], gpa=ipa)
            e.add("kvm_mmio", n, type=MMIO_READ, len=key["size"], gpa=ipa)
        e.user(KVM_EXIT_MMIO, n)

    def user_key(self, key):
        return (f"{'mmio-write' if self.write else 'mmio-read'}:"
                f"{key['ipa']:#x}/{key['size']}")


class Call:
    """hvc or smc #0 with x0 = a function id, answered by KVM."""

    needs_key = True

    def __init__(self, conduit):
        self.conduit = conduit

    def parse(self, key):
        fid = parse_number(key, 32, "function id")
        if fid in ACTING_FUNCTIONS:
            raise ValueError(f"function {fid:#x} ({ACTING_FUNCTIONS[fid]}) "
                             "makes KVM act; choose another id")
        return {"function": fid}

    def code(self, key):
        insn = hvc(0) if self.conduit == "hvc" else smc(0)
        # KVM returns its answer in x0: reload the id every time.
        return [], mov_imm(X0, key["function"]) + [insn]

    def expect(self, key, n, e):
        if self.conduit == "hvc":
            e.add("kvm_exit", n, ret=RET["TRAP"], esr_ec=EC["HVC64"])
            e.add("kvm_hvc_arm64", n, r0=key["function"], imm=0)
        else:       # 6.1 traces no event of its own for an SMC
            e.add("kvm_exit", n, ret=RET["TRAP"], esr_ec=EC["SMC64"])

    def user_key(self, key):
        return None


class Wfi:
    needs_key = False

    def parse(self, key):
        if key:
            raise ValueError("wfi takes no key: wfi:COUNT")
        return {}

    def code(self, key):
        return [], [WFI]

    def expect(self, key, n, e):
        e.add("kvm_exit", n, ret=RET["TRAP"], esr_ec=EC["WFx"])
        e.add("kvm_wfx_arm64", n, is_wfe=0)

    def user_key(self, key):
        return None


class SysRegRead:
    needs_key = True

    def parse(self, key):
        if key not in SYSREGS:
            raise ValueError(f"register {key!r}: one of "
                             f"{', '.join(SYSREGS)}")
        return {"name": key}

    def code(self, key):
        return [], [mrs(X11, *SYSREGS[key["name"]][0])]

    def expect(self, key, n, e):
        op0, op1, crn, crm, op2 = SYSREGS[key["name"]][0]
        e.add("kvm_exit", n, ret=RET["TRAP"], esr_ec=EC["SYS64"])
        e.add("kvm_sys_access", n, Op0=op0, Op1=op1, CRn=crn, CRm=crm,
              Op2=op2, is_write=0)

    def user_key(self, key):
        return None


KINDS = {"mmio-write": Mmio(True), "mmio-read": Mmio(False),
         "hvc": Call("hvc"), "smc": Call("smc"), "wfi": Wfi(),
         "mrs": SysRegRead()}


def parse_step(text):
    """'[VCPUS@]KIND[:KEY]:COUNT' -> (vCPU indexes or None, Step)."""
    return parse_step_of(text, KINDS)


class Program(Steps):
    """A vCPU's steps, its machine code and what it must cause."""

    kinds = KINDS

    def __init__(self, steps, code_page):
        super().__init__(steps)
        self.code_page = code_page

    def code(self):
        # Each step: "x9 = COUNT; SETUP; again: BODY; subs x9, x9, #1;
        # b.ne again"; then the write to DONE_ADDR, and a branch to itself
        # should user space ever resume the vCPU.
        words = []
        for s in self.steps:
            setup, body = KINDS[s.kind].code(s.key)
            words += mov_imm(X9, s.count) + setup + body + [subs_one(X9)]
            words.append(b_ne(-(len(body) + 1)))
        words += mov_imm(X10, DONE_ADDR) + [store(4, X11, X10), b_self()]
        code = words_to_bytes(words)
        if len(code) > PAGE:
            raise RuntimeError(f"a vCPU's program needs {len(code)} bytes, "
                               f"more than its {PAGE}-byte page")
        return code

    def expected(self):
        e = Expect()
        # The first fetch from the code page, which KVM then maps.
        e.add("kvm_exit", 1, ret=RET["TRAP"], esr_ec=EC["IABT_LOW"])
        e.add("kvm_guest_fault", 1, ipa=self.code_page)
        for s in self.steps:
            KINDS[s.kind].expect(s.key, s.count, e)
        Mmio(True).expect({"ipa": DONE_ADDR, "size": 4}, 1, e)
        return e.as_json()


class Vm:
    """A KVM VM with RAM_SIZE bytes of RAM at RAM_BASE, no irqchip."""

    def __init__(self):
        open_vm(self, RAM_SIZE, RAM_BASE)       # type 0: default IPA size
        self.target = KvmVcpuInit()
        ioctl(self.fd, KVM_ARM_PREFERRED_TARGET, self.target)
        table = vector_table()
        self.mem[VECTORS - RAM_BASE:VECTORS - RAM_BASE + len(table)] = table

    def create_vcpu(self, index, code):
        """Make vCPU `index` run `code` from its page, at EL1."""
        fd = ioctl(self.fd, KVM_CREATE_VCPU, index)
        init = KvmVcpuInit(target=self.target.target)
        init.features[0] = 1 << KVM_ARM_VCPU_PSCI_0_2
        ioctl(fd, KVM_ARM_VCPU_INIT, init)
        offset = index * PAGE
        self.mem[offset:offset + len(code)] = code
        set_reg(fd, REG_PC, RAM_BASE + offset)
        set_reg(fd, REG_PSTATE, PSTATE_EL1H_MASKED)
        set_reg(fd, REG_VBAR_EL1, VECTORS)
        run = mmap.mmap(fd, self.run_size, mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE)
        return fd, run


def set_reg(fd, reg_id, value):
    buf = ctypes.c_uint64(value)
    ioctl(fd, KVM_SET_ONE_REG,
          KvmOneReg(id=reg_id, addr=ctypes.addressof(buf)))


def get_reg(fd, reg_id):
    buf = ctypes.c_uint64()
    ioctl(fd, KVM_GET_ONE_REG,
          KvmOneReg(id=reg_id, addr=ctypes.addressof(buf)))
    return buf.value


class VcpuThread(VcpuRunner):
    """Runs one vCPU until its write to DONE_ADDR."""

    def __init__(self, vm, index, program, ready, go, name):
        super().__init__(name=name.format(n=index), daemon=True)
        self.index, self.program = index, program
        self.ready, self.go = ready, go
        self.tid = None
        self.exits = {}         # KVM_EXIT_* name -> count seen by user space
        self.detail = {}        # 'mmio-write:0x10000000/4' ... -> count
        self.error = None
        self.done = False
        self.elapsed = 0.0
        self.fd, self.run_page = vm.create_vcpu(index, program.code())
        self.wakeups = 0        # signals the waker sent it

    def _mmio(self):
        """Answer an MMIO exit; return False at the program's end."""
        page = self.run_page
        ipa, _, size, is_write = KVM_RUN_MMIO.unpack_from(page, KVM_RUN_UNION)
        if ipa == DONE_ADDR and is_write:
            self.done = True
            return False
        if ipa == FAULT_ADDR and is_write:
            self.error = "guest exception: " + ", ".join(
                f"{name} {get_reg(self.fd, reg):#x}"
                for name, reg in FAULT_REGS.items())
            return False
        kind = "mmio-write" if is_write else "mmio-read"
        key = f"{kind}:{ipa:#x}/{size}"
        self.detail[key] = self.detail.get(key, 0) + 1
        if not is_write:        # the load reads 0
            page[KVM_RUN_UNION + 8:KVM_RUN_UNION + 16] = bytes(8)
        return True

    def _run_vcpu(self):
        fd, page, names = self.fd, self.run_page, KVM_EXIT_NAMES
        start = time.monotonic()
        while True:
            try:
                ioctl(fd, KVM_RUN)
            except InterruptedError:
                pass            # a signal; KVM set exit_reason to INTR
            reason = U32.unpack_from(page, KVM_RUN_EXIT_REASON)[0]
            name = names.get(reason, str(reason))
            self.exits[name] = self.exits.get(name, 0) + 1
            if reason == KVM_EXIT_MMIO:
                if not self._mmio():
                    break
            elif reason != KVM_EXIT_INTR:
                self.error = f"unexpected exit {name}"
                break
        self.elapsed = time.monotonic() - start

    def problems(self):
        if self.error:
            return [self.error]
        if not self.done:
            return ["did not reach its end"]
        return self.user_problems()

    def report(self, done):
        entry = {"index": self.index, "tid": self.tid, "comm": self.name,
                 "code_ipa": self.program.code_page,
                 "program": [f"{s.text}:{s.count}"
                             for s in self.program.steps],
                 "expected_events": self.program.expected(),
                 "expected_user": self.program.user_detail()}
        if done:
            entry["user_exits"] = dict(self.exits)
            entry["user_detail"] = dict(self.detail)
            entry["seconds"] = round(self.elapsed, 6)
            entry["wakeups"] = self.wakeups
            entry["errors"] = self.problems()
        return entry


# --- command line ------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="--do KIND[:KEY]:COUNT, KIND one of: " + ", ".join(KINDS) +
        "; mrs registers: " + ", ".join(SYSREGS) +
        " (see the module's docstring)")
    p.add_argument("--vcpus", type=int,
                   help="number of vCPUs (default: highest --do vCPU + 1, "
                        "else 1)")
    p.add_argument("--do", type=functools.partial(do_step, kinds=KINDS),
                   action="append", default=[],
                   metavar="[VCPUS@]KIND[:KEY]:COUNT",
                   help="do this COUNT times (repeatable, in order); "
                        "VCPUS: comma list of vCPU indexes (default all)")
    p.add_argument("--thread-name", default="CPU {n}/KVM",
                   help="vCPU thread names, {n} the vCPU index (default: "
                        "QEMU's 'CPU {n}/KVM')")
    add_report_options(p)
    args = p.parse_args(argv)
    if args.vcpus is None:
        named = [max(where) + 1 for where, _ in args.do if where]
        args.vcpus = max([1] + named)
    if not 1 <= args.vcpus <= MAX_VCPUS:
        p.error(f"--vcpus must be 1 to {MAX_VCPUS}")
    check_do_vcpus(p, args)
    args.programs = [
        Program([s for where, s in args.do if where is None or i in where],
                RAM_BASE + i * PAGE)
        for i in range(args.vcpus)]
    return args


def kvm_wait(tid):
    """If the thread sleeps in KVM's vCPU block (a trapped WFI), an id of
    this sleep: its count of voluntary context switches, which the next
    sleep raises.  None if it runs or sleeps elsewhere (for Python's lock)."""
    task = f"/proc/self/task/{tid}"
    try:
        with open(f"{task}/wchan") as f:
            if not f.read().startswith("kvm_vcpu_"):
                return None
        with open(f"{task}/status") as f:
            status = dict(line.split(":", 1) for line in f)
    except (OSError, ValueError):
        return None
    if not status["State"].split()[0] == "S":
        return None
    return int(status["voluntary_ctxt_switches"])


def wake_wfis(vcpus, stop, period=0.001):
    """Until `stop`, end each trapped WFI with one SIGUSR1 (see --do wfi):
    a thread seen sleeping in KVM gets one signal per sleep."""
    waiting = [v for v in vcpus if v.program.needs("wfi")]
    woken = {}
    while waiting and not stop.wait(period):
        for v in waiting:
            sleep = kvm_wait(v.tid)
            if sleep is not None and woken.get(v.tid) != sleep:
                woken[v.tid] = sleep
                v.wakeups += 1
                signal.pthread_kill(v.ident, signal.SIGUSR1)


def make_report(args, vcpus, state):
    return {"pid": os.getpid(), "state": state, "isa": "arm64",
            "exit_codes": {"ret": RET, "esr_ec": EC},
            "vcpus": [v.report(state == "done") for v in vcpus]}


def main(argv=None):
    args = parse_args(argv)
    try:
        vm = Vm()
        ready = threading.Barrier(args.vcpus + 1)
        go = threading.Event()
        vcpus = [VcpuThread(vm, i, args.programs[i], ready, go,
                            args.thread_name)
                 for i in range(args.vcpus)]
    except (OSError, RuntimeError) as e:
        print(f"arm64_guest.py: {e}", file=sys.stderr)
        return 1
    for v in vcpus:
        v.start()
    ready.wait()                # every vCPU thread now has its tid and comm
    announce_ready("arm64_guest.py", args.report,
                   make_report(args, vcpus, "ready"), args.hold)
    # KVM_RUN returns EINTR to the vCPU thread; Python's handler does
    # nothing (and runs in this thread).
    signal.signal(signal.SIGUSR1, lambda *_: None)
    stop = threading.Event()
    waker = threading.Thread(target=wake_wfis, args=(vcpus, stop),
                             daemon=True)
    waker.start()
    go.set()
    join_all(vcpus, threading.Event())
    stop.set()
    waker.join()
    report = make_report(args, vcpus, "done")
    write_report(args.report, report)
    for v in report["vcpus"]:
        print(f"arm64_guest.py: pid {os.getpid()} vCPU {v['index']} tid "
              f"{v['tid']}: user exits {v['user_exits']}", flush=True)
    return print_problems("arm64_guest.py", report)


if __name__ == "__main__":
    sys.exit(main())
