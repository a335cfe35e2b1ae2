#!/usr/bin/python3
"""Tiny KVM guests with exactly known VM exits, for testing kvmexit.

Stdlib only: it drives /dev/kvm with raw ioctls, so it runs in the lab
(tests/lab/run) under /usr/bin/python3 with nothing else installed.  It
makes one VM with one thread per vCPU; like QEMU, the threads are named
"CPU <n>/KVM".  Each vCPU runs its own 16-bit real-mode program, a list of
steps "do KIND (on KEY) COUNT times", then HLT:

    --io N       N x  out dx, al to port 0x510  -> IOIO, to user space
    --cr4 M      M x  mov eax, cr4; mov cr4, eax -> READ_CR4 + WRITE_CR4 on
                                                   SVM, in KVM; on VMX the
                                                   write flips CR4.MCE ->
                                                   one CR_ACCESS
    --do KIND[:KEY]:COUNT  (repeatable, in order; VCPUS@ limits it to some
                            vCPUs, e.g. "1@out:0x511/2:7" or "0,2@cpuid:1:5")
        out:PORT[/SIZE]     out dx, al|ax|eax  -> KVM_EXIT_IO (SIZE 1, 2, 4)
        in:PORT[/SIZE]      in al|ax|eax, dx   -> KVM_EXIT_IO
        rdmsr:MSR           rdmsr              -> in KVM for the MSRs of
        wrmsr:MSR[=VALUE]   wrmsr                 KERNEL_MSRS, else
                                                  KVM_EXIT_X86_RDMSR/WRMSR
        cpuid:LEAF          cpuid              -> in KVM
        hypercall:NR        vmmcall (SVM) / vmcall (VMX) with eax=NR -> in
                                                  KVM, which answers
                                                  -KVM_ENOSYS
        mmio-write:GPA[/SIZE]  mov [GPA], al|ax|eax -> KVM_EXIT_MMIO
        mmio-read:GPA[/SIZE]   mov al|ax|eax, [GPA] -> KVM_EXIT_MMIO
        exc:1               icebp: #DB intercepted, KVM re-injects it into
                                                  the guest (IVT handler);
                                                  QEMU's emulator makes it a
                                                  #UD instead
        exc:3               int3 under KVM_SET_GUEST_DEBUG -> #BP
                                                  intercepted, KVM_EXIT_DEBUG
                                                  (not under QEMU's emulator:
                                                  its SVM takes int3 for a
                                                  software interrupt)
        exc:6               ud2: #UD intercepted, KVM fails to emulate it
                                                  and re-injects it; the
                                                  guest's IVT handler skips
                                                  it
        cr4:COUNT           as --cr4
    hlt                                         -> HLT, to user space

Exit codes follow the CPU (--isa): SVM's, or VMX's, where a CR4 read
never exits and a write only if it changes a bit KVM owns, MMIO pages
take EPT_VIOLATION first and EPT_MISCONFIG after, and exceptions are
EXCEPTION_NMI with the vector in intr_info.  The VMX side is written from
the SDM and KVM's code; the Intel lab (tests/lab/test_lab_intel.py) runs
its OUT/IN, MSR, CPUID, VMCALL, CR4 and HLT steps on real VMX exits.

The report has, per vCPU, what the kernel's tracepoints must count for its
thread: "expected_events" {tracepoint: [{field: value, ..., "count": n}]}
for kvm_exit (exit codes of this CPU's ISA), kvm_pio, kvm_msr, kvm_mmio,
kvm_hypercall, kvm_cpuid, kvm_inj_exception, kvm_page_fault and
kvm_userspace_exit; an entry names only the fields it fixes (count the sum
over the others).  Expect noise on top: NPF / EPT_VIOLATION once for each
RAM page a vCPU touches before KVM has mapped it for the VM, and INTR /
EXTERNAL_INTERRUPT whenever a host interrupt arrives in guest mode.

Usage (as root, where /dev/kvm is a real KVM):

    guest.py --io 100,200,300 --cr4 5 --report r.json --hold go
        3 vCPUs; vCPU i does io[i] OUTs and 5 CR4 round trips.  Writes
        r.json once all vCPU threads exist (state "ready": pid, and per vCPU
        its tid, comm and expected exit counts), then waits until the file
        "go" exists (or, for a FIFO, one byte arrives; "-" means a line on
        stdin) so that a tracer can attach first.  Then it runs, rewrites
        r.json (state "done") adding what user space saw per vCPU, and
        exits 0 if every vCPU halted after exactly the user-space exits
        its program makes.

    guest.py --io 0 --do out:0x70/1:10 --do rdmsr:0x1b:5 \\
             --do mmio-write:0xd0000000/4:3 --do exc:6:2 --report r.json

    guest.py --vcpus 2 --cr4 10 --seconds 5 --report r.json
        Throughput mode: each vCPU loops "10 CR4 round trips, 1 OUT" until
        5 s have passed (inf: until SIGINT), stopping at an IO exit, so
        IOIO == io_exits and READ_CR4 == WRITE_CR4 == 10 * io_exits still
        hold exactly; HLT is 0.  The report has exits per second.  No --do.
        A KVM_RUN that has not come back after --run-limit seconds (the
        guest looping inside KVM, which never returns to user space where
        the deadline is checked) is ended (a signal, with the run page's
        immediate_exit set so that a signal sent just before KVM_RUN is not
        lost): the vCPU reports it as an error, and the run fails.

Run it several times for several VMs (processes).
"""

import argparse
import ctypes
import json
import mmap
import os
import signal
import stat
import struct
import sys
import threading
import time
from fcntl import ioctl  # mutates ctypes structures in place

# --- KVM's user ABI (x86_64), from include/uapi/linux/kvm.h ------------------

KVMIO = 0xAE


def _ioc(direction, nr, size):
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64),
                ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class KvmRegs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16)] + [
                (name, ctypes.c_uint8) for name in (
                    "type", "present", "dpl", "db", "s", "l", "g", "avl",
                    "unusable", "padding")]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [(name, KvmSegment) for name in (
        "cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + [
        ("gdt", KvmDtable), ("idt", KvmDtable)] + [
        (name, ctypes.c_uint64) for name in (
            "cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")] + [
        ("interrupt_bitmap", ctypes.c_uint64 * 4)]


class KvmGuestDebug(ctypes.Structure):
    _fields_ = [("control", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("debugreg", ctypes.c_uint64 * 8)]


class KvmEnableCap(ctypes.Structure):
    _fields_ = [("cap", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("args", ctypes.c_uint64 * 4), ("pad", ctypes.c_uint8 * 64)]


class KvmMsrs1(ctypes.Structure):
    """struct kvm_msrs with room for one struct kvm_msr_entry."""
    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32),
                ("data", ctypes.c_uint64)]


# The kernel checks ioctl sizes; a layout slip would fail loudly anyway, but
# here it fails with a clearer message.
assert ctypes.sizeof(KvmRegs) == 144 and ctypes.sizeof(KvmSregs) == 312
assert ctypes.sizeof(KvmGuestDebug) == 72
assert ctypes.sizeof(KvmEnableCap) == 104

KVM_GET_API_VERSION = _ioc(0, 0x00, 0)
KVM_CREATE_VM = _ioc(0, 0x01, 0)
KVM_CHECK_EXTENSION = _ioc(0, 0x03, 0)
KVM_GET_VCPU_MMAP_SIZE = _ioc(0, 0x04, 0)
KVM_CREATE_VCPU = _ioc(0, 0x41, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(1, 0x46,
                                  ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_RUN = _ioc(0, 0x80, 0)
KVM_GET_REGS = _ioc(2, 0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _ioc(1, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ioc(2, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _ioc(1, 0x84, ctypes.sizeof(KvmSregs))
KVM_GET_MSRS = _ioc(3, 0x88, 8)         # sizeof(struct kvm_msrs) header
KVM_SET_GUEST_DEBUG = _ioc(1, 0x9b, ctypes.sizeof(KvmGuestDebug))
KVM_ENABLE_CAP = _ioc(1, 0xa3, ctypes.sizeof(KvmEnableCap))

KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_USE_SW_BP = 0x10000
KVM_CAP_X86_USER_SPACE_MSR = 188
# Send the MSR accesses KVM would answer with #GP (unknown index, or a value
# it refuses) to user space: the guest has no #GP handler.
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1

# struct kvm_run: exit_reason at 8; the per-reason union at 32.
KVM_RUN_IMMEDIATE_EXIT = 1                # a __u8 before exit_reason
KVM_RUN_EXIT_REASON = 8
KVM_RUN_IO = struct.Struct("<BBHIQ")    # direction, size, port, count, off
KVM_RUN_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
KVM_RUN_DEBUG = struct.Struct("<IIQ")   # exception, pad, pc
KVM_RUN_MSR = struct.Struct("<B7xIIQ")  # error, reason, index, data
KVM_RUN_MSR_DATA = 48
KVM_RUN_UNION = 32
U32, U64 = struct.Struct("<I"), struct.Struct("<Q")
KVM_EXIT_IO_IN = 0

KVM_EXIT_IO = 2
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_INTR = 10
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 4: "DEBUG",
                  5: "HLT", 6: "MMIO", 8: "SHUTDOWN", 9: "FAIL_ENTRY",
                  10: "INTR", 17: "INTERNAL_ERROR", 29: "X86_RDMSR",
                  30: "X86_WRMSR"}

# kvm:kvm_exit's exit_reason for the exits these guests make, per ISA
# (arch/x86/include/uapi/asm/svm.h and vmx.h).  SVM exceptions are
# EXCP_BASE + vector; VMX has one EXCEPTION_NMI reason and the vector in
# intr_info.
EXIT_CODES = {
    "svm": {"READ_CR4": 0x04, "WRITE_CR4": 0x14, "EXCP_BASE": 0x40,
            "INTR": 0x60, "CPUID": 0x72, "HLT": 0x78, "IOIO": 0x7b,
            "MSR": 0x7c, "VMMCALL": 0x81, "NPF": 0x400},
    "vmx": {"EXCEPTION_NMI": 0, "EXTERNAL_INTERRUPT": 1, "CPUID": 10,
            "HLT": 12, "VMCALL": 18, "CR_ACCESS": 28, "IO_INSTRUCTION": 30,
            "MSR_READ": 31, "MSR_WRITE": 32, "EPT_VIOLATION": 48,
            "EPT_MISCONFIG": 49},
}
SVM_EXIT_CODES = EXIT_CODES["svm"]     # the report's historical name

# --- real-mode machine code -------------------------------------------------

# 16-bit encodings (checked with GNU as, .code16).  0x66 makes an operand
# 32-bit, 0x67 an address; imm16/imm32/addr32 follow little-endian.
ENCODING = {
    "mov dx, imm16": "ba",
    "mov eax, imm32": "66b8",
    "mov ecx, imm32": "66b9",
    "mov edx, imm32": "66ba",
    "mov ebp, imm32": "66bd",
    "dec ebp": "664d",
    "jnz rel8": "75",
    "out dx, al": "ee", "out dx, ax": "ef", "out dx, eax": "66ef",
    "in al, dx": "ec", "in ax, dx": "ed", "in eax, dx": "66ed",
    "mov [addr32], al": "67a2", "mov [addr32], ax": "67a3",
    "mov [addr32], eax": "6667a3",
    "mov al, [addr32]": "67a0", "mov ax, [addr32]": "67a1",
    "mov eax, [addr32]": "6667a1",
    "rdmsr": "0f32", "wrmsr": "0f30", "cpuid": "0fa2",
    "vmmcall": "0f01d9", "vmcall": "0f01c1",
    "mov eax, cr4": "0f20e0", "mov cr4, eax": "0f22e0", "xor al, imm8": "34",
    "int3": "cc", "icebp": "f1", "ud2": "0f0b", "hlt": "f4",
}

# The guest's handler of the exceptions KVM re-injects (#DB, #UD).  The
# pushed IP points at a ud2 (a fault) and, depending on who delivers it, at
# or after an icebp (a trap): skip the instruction only if IP is still on
# it.  SI and BP are restored; no step uses them otherwise.
EXCEPTION_HANDLER = bytes.fromhex(
    "55"            # push bp
    "89e5"          # mov  bp, sp
    "56"            # push si
    "8b7602"        # mov  si, [bp+2]          ; the return IP
    "2e803cf1"      # cmp  byte [cs:si], 0xf1  ; icebp?
    "7505"          # jne  not_icebp
    "ff4602"        # inc  word [bp+2]
    "eb0b"          # jmp  done
    "2e813c0f0b"    # not_icebp: cmp word [cs:si], 0x0b0f   ; ud2?
    "7504"          # jne  done
    "83460202"      # add  word [bp+2], 2
    "5e"            # done: pop si
    "5d"            # pop  bp
    "cf")           # iret
ACC = {1: "al", 2: "ax", 4: "eax"}     # the accumulator of each size


def asm(*lines):
    return b"".join(bytes.fromhex(ENCODING[line]) for line in lines)


def imm(value, size):
    return value.to_bytes(size, "little")


GUEST_MEM_SIZE = 0x10000
HANDLER = 0x500                # EXCEPTION_HANDLER, for REINJECTED vectors
STRAY_HANDLER = 0x540          # any other vector: stop, so it shows
CODE_ADDR = 0x1000             # vCPU 0's program; the next ones follow it
STACK_TOP = 0xff00             # vCPU i's stack below STACK_TOP - i * 0x100
STACK_SIZE = 0x100
# Ports of --io.  No in-kernel device is created, so KVM hands every port to
# user space; the number only has to be recognisable.
IO_PORT = 0x510
CR4_MCE = 1 << 6
PAGE = 0x1000

# Throughput variant: esi = M CR4 round trips per OUT, forever.
TIMED_CODE = bytes.fromhex(
    "6689f3"    # top: mov ebx, esi
    "6685db"    # test ebx, ebx
    "740a"      # jz   io
    "0f20e0"    # cr4: mov eax, cr4
    "0f22e0"    # mov  cr4, eax
    "664b"      # dec  ebx
    "75f6"      # jnz  cr4
    "ee"        # io: out dx, al
    "ebeb")     # jmp  top

# --- the steps a vCPU can take, as data -------------------------------------

# MSRs that KVM answers itself on SVM and VMX alike: none is in either
# vendor's pass-through list, so every access exits; no in-kernel LAPIC is
# needed (reads of TSC_DEADLINE then give 0 and writes are dropped), and
# writing back the value an MSR holds raises no #GP.  Any other index is
# taken as one KVM does not know: its accesses go to user space
# (KVM_CAP_X86_USER_SPACE_MSR); user space checks that they did.
KERNEL_MSRS = {0x1b: "IA32_APICBASE", 0x1a0: "IA32_MISC_ENABLE",
               0x6e0: "IA32_TSC_DEADLINE"}

# Hypercall numbers KVM acts on (arch/x86/include/uapi/asm/kvm_para.h):
# kick a vCPU, write the clock to guest memory, send IPIs, yield, map GPA
# ranges.  Refused: a test guest must only make KVM count and answer.
ACTING_HYPERCALLS = {5: "KICK_CPU", 9: "CLOCK_PAIRING", 10: "SEND_IPI",
                     11: "SCHED_YIELD", 12: "MAP_GPA_RANGE"}

# Exceptions KVM intercepts in a real-mode guest, and the instruction that
# raises each: #DB always (KVM re-injects it), #BP only under guest debug
# (it then exits to user space, which skips the int3), #UD always (KVM tries
# to emulate, fails, re-injects it).
EXCEPTIONS = {1: "icebp", 3: "int3", 6: "ud2"}
REINJECTED = (1, 6)             # handled by the guest's EXCEPTION_HANDLER

# VMX intr_info of an exception exit: valid (bit 31), type << 8, vector;
# icebp's #DB is a "privileged software exception", int3's #BP a software
# exception, #UD a hardware one.
VMX_EXCEPTION_TYPE = {1: 5, 3: 6, 6: 3}

# SVM IOIO exit info 1 (AMD APM vol. 2, "IOIO intercept"): IN in bit 0,
# operand size bit, port in 31:16.  Its address-size bits (9:7) are left
# out: QEMU's emulated SVM (the lab) leaves them 0 for IN/OUT.
SVM_IOIO_IN = 1 << 0
SVM_IOIO_SIZE = {1: 1 << 4, 2: 1 << 5, 4: 1 << 6}
# VMX exit qualification of I/O (SDM "Exit Qualification for I/O
# Instructions"): size - 1, IN in bit 3, port in 31:16.
VMX_IO_IN = 1 << 3


class Expect:
    """Counts the kernel's tracepoints must show for one vCPU thread."""

    def __init__(self):
        self.events = {}            # event -> {((field, value), ...): count}

    def add(self, event, count, **fields):
        key = tuple(sorted(fields.items()))
        table = self.events.setdefault(event, {})
        table[key] = table.get(key, 0) + count

    def user(self, reason, count):
        self.add("kvm_userspace_exit", count, reason=reason)

    def as_json(self):
        return {event: [dict(key, count=n) for key, n in table.items()]
                for event, table in sorted(self.events.items())}


class Step:
    """One line of a program: do KIND on KEY, COUNT times."""

    def __init__(self, kind, key, count, text, source="--do"):
        self.kind, self.key, self.count, self.text = kind, key, count, text
        self.source = source


def parse_number(text, bits, what):
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None
    if not 0 <= value < 2 ** bits:
        raise ValueError(f"{what} {text} does not fit in {bits} bits")
    return value


def parse_sized(text, bits, what):
    """'ADDR[/SIZE]' -> (ADDR, SIZE); SIZE 1, 2 or 4, default 1."""
    where, _, size = text.partition("/")
    size = parse_number(size or "1", 8, "size")
    if size not in ACC:
        raise ValueError(f"size {size} is not 1, 2 or 4")
    return parse_number(where, bits, what), size


class PortIo:
    """out/in: each one a KVM_EXIT_IO (no in-kernel device on any port)."""

    needs_key = True

    def __init__(self, direction):
        self.direction = direction

    def parse(self, key):
        port, size = parse_sized(key, 16, "port")
        return {"port": port, "size": size}

    def code(self, key, isa, vcpu):
        acc = ACC[key["size"]]
        insn = (f"out dx, {acc}" if self.direction == "out"
                else f"in {acc}, dx")
        return asm("mov dx, imm16") + imm(key["port"], 2), asm(insn)

    def expect(self, key, n, isa, e):
        port, size, is_in = key["port"], key["size"], self.direction == "in"
        if isa == "svm":
            info1 = (port << 16 | SVM_IOIO_SIZE[size] |
                     (SVM_IOIO_IN if is_in else 0))
            e.add("kvm_exit", n, exit_reason=EXIT_CODES["svm"]["IOIO"],
                  info1=info1)
        else:
            info1 = port << 16 | (VMX_IO_IN if is_in else 0) | (size - 1)
            e.add("kvm_exit", n,
                  exit_reason=EXIT_CODES["vmx"]["IO_INSTRUCTION"],
                  info1=info1)
        e.add("kvm_pio", n, port=port, rw=0 if is_in else 1, size=size)
        e.user(KVM_EXIT_IO, n)

    def user_key(self, key):
        return f"{self.direction}:{key['port']:#x}/{key['size']}"


class Msr:
    """rdmsr/wrmsr: in KVM for KERNEL_MSRS, else a user-space MSR exit."""

    needs_key = True

    def __init__(self, write):
        self.write = write

    def parse(self, key):
        index, _, value = key.partition("=")
        if value and not self.write:
            raise ValueError("only wrmsr takes a value")
        return {"msr": parse_number(index, 32, "MSR"),
                "value": parse_number(value, 64, "value") if value else None}

    def code(self, key, isa, vcpu):
        setup = asm("mov ecx, imm32") + imm(key["msr"], 4)
        if not self.write:
            return setup, asm("rdmsr")
        value = key["value"]
        if value is None:       # write back what it holds: never a #GP
            value = vcpu.read_msr(key["msr"])
        setup += (asm("mov eax, imm32") + imm(value & 0xffffffff, 4) +
                  asm("mov edx, imm32") + imm(value >> 32, 4))
        return setup, asm("wrmsr")

    def expect(self, key, n, isa, e):
        if isa == "svm":
            e.add("kvm_exit", n, exit_reason=EXIT_CODES["svm"]["MSR"],
                  info1=int(self.write))
        else:
            name = "MSR_WRITE" if self.write else "MSR_READ"
            e.add("kvm_exit", n, exit_reason=EXIT_CODES["vmx"][name])
        if key["msr"] in KERNEL_MSRS:
            e.add("kvm_msr", n, ecx=key["msr"], write=int(self.write))
        else:       # KVM traces kvm_msr only for accesses it completes
            e.user(KVM_EXIT_X86_WRMSR if self.write else KVM_EXIT_X86_RDMSR,
                   n)

    def user_key(self, key):
        if key["msr"] in KERNEL_MSRS:
            return None
        return f"{'wrmsr' if self.write else 'rdmsr'}:{key['msr']:#x}"


class Cpuid:
    needs_key = True

    def parse(self, key):
        return {"leaf": parse_number(key, 32, "leaf")}

    def code(self, key, isa, vcpu):
        # cpuid overwrites eax..edx: load leaf and subleaf 0 every time.
        return b"", (asm("mov eax, imm32") + imm(key["leaf"], 4) +
                     asm("mov ecx, imm32") + imm(0, 4) + asm("cpuid"))

    def expect(self, key, n, isa, e):
        e.add("kvm_exit", n, exit_reason=EXIT_CODES[isa]["CPUID"])
        e.add("kvm_cpuid", n, function=key["leaf"])

    def user_key(self, key):
        return None


class Hypercall:
    needs_key = True

    def parse(self, key):
        nr = parse_number(key, 32, "hypercall number")
        if nr in ACTING_HYPERCALLS:
            raise ValueError(f"hypercall {nr} ({ACTING_HYPERCALLS[nr]}) "
                             "makes KVM act; choose another number")
        return {"nr": nr}

    def code(self, key, isa, vcpu):
        # The vendor's own instruction: the other one is a #UD that KVM
        # patches in guest memory into this one.
        insn = "vmmcall" if isa == "svm" else "vmcall"
        # KVM returns its answer in eax: reload the number every time.
        return b"", asm("mov eax, imm32") + imm(key["nr"], 4) + asm(insn)

    def expect(self, key, n, isa, e):
        reason = "VMMCALL" if isa == "svm" else "VMCALL"
        e.add("kvm_exit", n, exit_reason=EXIT_CODES[isa][reason])
        e.add("kvm_hypercall", n, nr=key["nr"])

    def user_key(self, key):
        return None


class Mmio:
    """Accesses outside every memory slot: KVM emulates them and exits.

    The first access to a page faults on a missing mapping (SVM NPF, VMX
    EPT_VIOLATION); KVM then caches the page as MMIO with a mapping that
    faults differently (NPF with the reserved-bit error, EPT_MISCONFIG).
    Each page therefore belongs to one vCPU (checked), so that its first
    access is known."""

    needs_key = True

    def __init__(self, write):
        self.write = write

    def parse(self, key):
        gpa, size = parse_sized(key, 32, "address")
        if gpa < GUEST_MEM_SIZE:
            raise ValueError(f"address {gpa:#x} is in guest RAM "
                             f"(below {GUEST_MEM_SIZE:#x})")
        if gpa + size > 2 ** 32:
            raise ValueError(f"address {gpa:#x} + {size} passes 4 GiB")
        if gpa // PAGE != (gpa + size - 1) // PAGE:
            raise ValueError(f"access at {gpa:#x} crosses a page")
        return {"gpa": gpa, "size": size}

    def code(self, key, isa, vcpu):
        acc = ACC[key["size"]]
        insn = (f"mov [addr32], {acc}" if self.write
                else f"mov {acc}, [addr32]")
        return b"", asm(insn) + imm(key["gpa"], 4)

    def expect(self, key, n, isa, e, first):
        gpa = key["gpa"]
        if isa == "svm":
            # Every access is an NPF; its info2 is the address.
            e.add("kvm_exit", n, exit_reason=EXIT_CODES["svm"]["NPF"],
                  info2=gpa)
            e.add("kvm_page_fault", n, fault_address=gpa)
        else:
            # kvm_exit has no address on VMX, and EPT_VIOLATION also counts
            # RAM pages: the address is in kvm_page_fault, which only the
            # violation traces.
            later = n - first
            if later:
                e.add("kvm_exit", later,
                      exit_reason=EXIT_CODES["vmx"]["EPT_MISCONFIG"])
            if first:
                e.add("kvm_page_fault", first, fault_address=gpa)
        if self.write:
            e.add("kvm_mmio", n, type=2, gpa=gpa)
        else:       # traced when it leaves (unsatisfied) and when completed
            e.add("kvm_mmio", n, type=0, gpa=gpa)
            e.add("kvm_mmio", n, type=1, gpa=gpa)
        e.user(KVM_EXIT_MMIO, n)

    def user_key(self, key):
        return (f"{'mmio-write' if self.write else 'mmio-read'}:"
                f"{key['gpa']:#x}/{key['size']}")


class Vector:
    needs_key = True

    def parse(self, key):
        vector = parse_number(key, 8, "vector")
        if vector not in EXCEPTIONS:
            raise ValueError(f"vector {vector}: only "
                             f"{sorted(EXCEPTIONS)} are intercepted")
        return {"vector": vector}

    def code(self, key, isa, vcpu):
        return b"", asm(EXCEPTIONS[key["vector"]])

    def expect(self, key, n, isa, e):
        v = key["vector"]
        if isa == "svm":
            e.add("kvm_exit", n,
                  exit_reason=EXIT_CODES["svm"]["EXCP_BASE"] + v)
        else:
            e.add("kvm_exit", n,
                  exit_reason=EXIT_CODES["vmx"]["EXCEPTION_NMI"],
                  intr_info=1 << 31 | VMX_EXCEPTION_TYPE[v] << 8 | v)
        if v in REINJECTED:
            # Once each; an exit while the guest takes one (NPF on the IVT,
            # a host interrupt) injects it again, with reinjected=1.
            e.add("kvm_inj_exception", n, exception=v, reinjected=0)
        else:
            e.user(KVM_EXIT_DEBUG, n)

    def user_key(self, key):
        return "exc:3" if key["vector"] == 3 else None


class Cr4:
    needs_key = False

    def parse(self, key):
        if key:
            raise ValueError("cr4 takes no key: cr4:COUNT")
        return {}

    def code(self, key, isa, vcpu):
        if isa == "svm":
            return b"", asm("mov eax, cr4", "mov cr4, eax")
        # VMX exits on a CR4 write only if it changes a bit KVM owns (the
        # CR4 guest/host mask): flip CR4.MCE, owned by KVM and valid
        # whatever the guest's CPUID, harmless in real mode.
        return b"", asm("mov eax, cr4", "xor al, imm8") + \
            imm(CR4_MCE, 1) + asm("mov cr4, eax")

    def expect(self, key, n, isa, e):
        if isa == "svm":
            e.add("kvm_exit", n, exit_reason=EXIT_CODES["svm"]["READ_CR4"])
            e.add("kvm_exit", n, exit_reason=EXIT_CODES["svm"]["WRITE_CR4"])
        else:   # the read never exits; the write is one CR_ACCESS
            e.add("kvm_exit", n, exit_reason=EXIT_CODES["vmx"]["CR_ACCESS"])

    def user_key(self, key):
        return None


KINDS = {"out": PortIo("out"), "in": PortIo("in"),
         "rdmsr": Msr(False), "wrmsr": Msr(True), "cpuid": Cpuid(),
         "hypercall": Hypercall(), "mmio-write": Mmio(True),
         "mmio-read": Mmio(False), "exc": Vector(), "cr4": Cr4()}


def parse_step(text, kinds=KINDS):
    """'[VCPUS@]KIND[:KEY]:COUNT' -> (vCPU indexes or None, Step), KIND a
    key of `kinds` (arm64_guest.py passes its own table)."""
    vcpus, at, rest = text.rpartition("@")
    where = None
    if at:
        where = {parse_number(v, 16, "vCPU") for v in vcpus.split(",")}
    kind, _, rest = rest.partition(":")
    if kind not in kinds:
        raise ValueError(f"unknown kind {kind!r} (one of "
                         f"{', '.join(kinds)})")
    key, _, count = rest.rpartition(":")
    if not count:
        raise ValueError(f"{text!r} has no COUNT")
    if not key and kinds[kind].needs_key:
        raise ValueError(f"{kind} needs a key: {kind}:KEY:COUNT")
    return where, Step(kind, kinds[kind].parse(key), parse_number(
        count, 32, "count"), f"{kind}:{key}" if key else kind)


class Steps:
    """A vCPU's steps of a KINDS table (`kinds`), those of COUNT 0 left
    out: what user space must see of them."""

    kinds = KINDS

    def __init__(self, steps):
        self.steps = [s for s in steps if s.count]

    def user_detail(self):
        """What user space must see, keyed like --do: 'out:0x510/1'."""
        seen = {}
        for s in self.steps:
            key = self.kinds[s.kind].user_key(s.key)
            if key:
                seen[key] = seen.get(key, 0) + s.count
        return seen

    def needs(self, *kinds):
        return any(s.kind in kinds for s in self.steps)


class Program(Steps):
    """A vCPU's steps, its machine code and what it must cause."""

    def code(self, isa, vcpu):
        # Each step is "mov ebp, COUNT; SETUP; again: BODY; dec ebp;
        # jnz again": ebp is the one register no step's instruction uses.
        out = bytearray()
        for s in self.steps:
            setup, body = KINDS[s.kind].code(s.key, isa, vcpu)
            loop = body + asm("dec ebp")
            rel = -(len(loop) + 2)
            out += asm("mov ebp, imm32") + imm(s.count, 4) + setup + loop
            out += asm("jnz rel8") + rel.to_bytes(1, "little", signed=True)
        return bytes(out + asm("hlt"))

    def mmio_pages(self):
        return {s.key["gpa"] // PAGE for s in self.steps
                if isinstance(KINDS[s.kind], Mmio)}

    def expected(self, isa):
        e = Expect()
        touched = set()
        for s in self.steps:
            kind = KINDS[s.kind]
            if isinstance(kind, Mmio):
                page = s.key["gpa"] // PAGE
                kind.expect(s.key, s.count, isa, e, int(page not in touched))
                touched.add(page)
            else:
                kind.expect(s.key, s.count, isa, e)
        e.add("kvm_exit", 1, exit_reason=EXIT_CODES[isa]["HLT"])
        e.user(KVM_EXIT_HLT, 1)
        return e.as_json()

    def legacy_expected(self):
        """The report's SVM reason counts kept from before --do."""
        def total(*kinds):
            return sum(s.count for s in self.steps if s.kind in kinds)
        cr4 = total("cr4")
        return {"IOIO": total("out", "in"), "READ_CR4": cr4,
                "WRITE_CR4": cr4, "HLT": 1}

    def needs_debug(self):
        return any(s.kind == "exc" and s.key["vector"] == 3
                   for s in self.steps)


def host_isa():
    """'svm' or 'vmx': which exit codes, and which hypercall instruction."""
    with open("/proc/cpuinfo") as f:
        text = f.read()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    if "svm" in flags:
        return "svm"
    if "vmx" in flags:
        return "vmx"
    # A KVM without either flag (e.g. paravirtual): go by the vendor.
    return "svm" if "AuthenticAMD" in text or "HygonGenuine" in text \
        else "vmx"


PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def set_thread_name(name):
    """Name the calling OS thread (its comm), as QEMU names vCPU threads."""
    if _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_NAME): " + os.strerror(err))


def open_vm(vm, mem_size, base=0):
    """Give `vm` /dev/kvm (.kvm), a new VM on it (.fd, its default type),
    the size of a vCPU's run page (.run_size) and mem_size bytes of RAM
    (.mem) at guest address `base`, in slot 0."""
    vm.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    version = ioctl(vm.kvm, KVM_GET_API_VERSION)
    if version != 12:
        raise RuntimeError(f"unexpected KVM API version {version}")
    vm.fd = ioctl(vm.kvm, KVM_CREATE_VM, 0)
    vm.run_size = ioctl(vm.kvm, KVM_GET_VCPU_MMAP_SIZE)
    vm.mem = mmap.mmap(-1, mem_size)
    region = KvmUserspaceMemoryRegion(
        slot=0, flags=0, guest_phys_addr=base, memory_size=mem_size,
        userspace_addr=ctypes.addressof(ctypes.c_char.from_buffer(vm.mem)))
    ioctl(vm.fd, KVM_SET_USER_MEMORY_REGION, region)


class Vm:
    """A KVM VM with GUEST_MEM_SIZE bytes of RAM at guest address 0."""

    def __init__(self, vcpus, user_msrs=False):
        self.vcpus = vcpus
        open_vm(self, GUEST_MEM_SIZE)
        self.next_code = CODE_ADDR
        self._install_handlers()
        if user_msrs:
            self._enable_user_msrs()

    def _install_handlers(self):
        """Real-mode IVT: #DB and #UD skip their instruction, any other
        vector halts.

        A vector nobody asked for (an int3 that was not intercepted, say)
        then ends the program early, which the user-space counts show."""
        end = HANDLER + len(EXCEPTION_HANDLER)
        self.mem[HANDLER:end] = EXCEPTION_HANDLER
        self.mem[STRAY_HANDLER:STRAY_HANDLER + 1] = asm("hlt")
        for vector in range(256):
            target = HANDLER if vector in REINJECTED else STRAY_HANDLER
            self.mem[vector * 4:vector * 4 + 4] = struct.pack("<HH", target,
                                                              0)

    def _enable_user_msrs(self):
        if ioctl(self.kvm, KVM_CHECK_EXTENSION,
                 KVM_CAP_X86_USER_SPACE_MSR) <= 0:
            raise RuntimeError("KVM lacks KVM_CAP_X86_USER_SPACE_MSR")
        cap = KvmEnableCap(cap=KVM_CAP_X86_USER_SPACE_MSR)
        cap.args[0] = KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN
        ioctl(self.fd, KVM_ENABLE_CAP, cap)

    def place_code(self, code):
        """Copy a program after the previous one; return its address."""
        addr = self.next_code
        end = STACK_TOP - self.vcpus * STACK_SIZE
        if addr + len(code) > end:
            raise RuntimeError(f"programs need more than the "
                               f"{end - CODE_ADDR} bytes for code")
        self.mem[addr:addr + len(code)] = code
        self.next_code = (addr + len(code) + 15) & ~15
        return addr

    def create_vcpu(self, index, regs, flat_ds=False):
        """Make vCPU `index` in real mode, CS base 0, with `regs`."""
        fd = ioctl(self.fd, KVM_CREATE_VCPU, index)
        sregs = KvmSregs()
        ioctl(fd, KVM_GET_SREGS, sregs)
        # Reset state has CS base 0xffff0000 (the BIOS alias); flatten it.
        sregs.cs.base = 0
        sregs.cs.selector = 0
        if flat_ds:
            # "Unreal mode": a 4 GiB DS limit lets 32-bit addresses reach
            # MMIO anywhere below 4 GiB without leaving real mode.
            sregs.ds.limit, sregs.ds.g = 0xffffffff, 1
        ioctl(fd, KVM_SET_SREGS, sregs)
        values = KvmRegs(rflags=2, rdx=IO_PORT, **regs)
        ioctl(fd, KVM_SET_REGS, values)
        run = mmap.mmap(fd, self.run_size, mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE)
        return fd, run


class VcpuRunner(threading.Thread):
    """A vCPU's thread: it names itself, meets the others at `ready`, waits
    for `go`, then runs the subclass's _run_vcpu, keeping any error for the
    report."""

    def run(self):
        try:
            set_thread_name(self.name)
            self.tid = threading.get_native_id()
        except Exception as e:  # reported, and the barrier must not hang
            self.error = f"setup: {e}"
        self.ready.wait()
        self.go.wait()
        if self.error is None:
            try:
                self._run_vcpu()
            except Exception as e:
                self.error = f"KVM_RUN: {e}"

    def user_problems(self):
        """How what user space saw differs from what the program makes."""
        want = self.program.user_detail()
        if self.detail != want:
            return [f"user space saw {self.detail}, expected {want}"]
        return []


class VcpuThread(VcpuRunner):
    """Runs one vCPU until HLT, or in timed mode until the deadline."""

    def __init__(self, vm, index, program, cr4, seconds, ready, go, stop,
                 isa, name="CPU {n}/KVM"):
        super().__init__(name=name.format(n=index), daemon=True)
        self.index, self.program, self.cr4 = index, program, cr4
        self.seconds, self.isa = seconds, isa
        self.ready, self.go, self.stop = ready, go, stop
        self.tid = None
        self.exits = {}         # KVM_EXIT_* name -> count seen by user space
        self.detail = {}        # 'out:0x510/1' ... -> count seen
        self.error = None
        self.elapsed = 0.0
        # Timed mode: when the KVM_RUN under way began (RunWatch), or None.
        self.run_since = None
        self.run_limit = None
        if seconds is None:
            self.fd, self.run_page = vm.create_vcpu(
                index, {"rsp": STACK_TOP - index * STACK_SIZE},
                flat_ds=program.needs("mmio-write", "mmio-read"))
            # Placed once the vCPU exists: wrmsr reads the value to write.
            code = program.code(isa, self)
            start = vm.place_code(code)
            regs = KvmRegs()
            ioctl(self.fd, KVM_GET_REGS, regs)
            regs.rip = start
            ioctl(self.fd, KVM_SET_REGS, regs)
            if program.needs_debug():
                debug = KvmGuestDebug(
                    control=KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP)
                ioctl(self.fd, KVM_SET_GUEST_DEBUG, debug)
        else:
            self.fd, self.run_page = vm.create_vcpu(
                index, {"rsi": cr4, "rip": vm.timed_code})

    def read_msr(self, index):
        """The MSR's value as KVM holds it (0 if KVM does not know it)."""
        msrs = KvmMsrs1(nmsrs=1, index=index)
        if ioctl(self.fd, KVM_GET_MSRS, msrs) != 1:
            return 0
        return msrs.data

    def _count(self, table, key):
        table[key] = table.get(key, 0) + 1

    def _user_exit(self, reason):
        """Answer an exit as a VMM would; return False to stop."""
        page = self.run_page
        if reason == KVM_EXIT_IO:
            direction, size, port, _, _ = KVM_RUN_IO.unpack_from(
                page, KVM_RUN_UNION)
            kind = "in" if direction == KVM_EXIT_IO_IN else "out"
            # An IN reads what KVM zeroed in the run page: nothing to do.
            self._count(self.detail, f"{kind}:{port:#x}/{size}")
        elif reason == KVM_EXIT_MMIO:
            gpa, _, size, is_write = KVM_RUN_MMIO.unpack_from(
                page, KVM_RUN_UNION)
            kind = "mmio-write" if is_write else "mmio-read"
            self._count(self.detail, f"{kind}:{gpa:#x}/{size}")
        elif reason == KVM_EXIT_DEBUG:
            vector, _, _ = KVM_RUN_DEBUG.unpack_from(page, KVM_RUN_UNION)
            self._count(self.detail, f"exc:{vector}")
            # RIP is still at the int3; go past it, as a debugger would.
            regs = KvmRegs()
            ioctl(self.fd, KVM_GET_REGS, regs)
            regs.rip += 1
            ioctl(self.fd, KVM_SET_REGS, regs)
        elif reason in (KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR):
            _, _, index, _ = KVM_RUN_MSR.unpack_from(page, KVM_RUN_UNION)
            kind = "rdmsr" if reason == KVM_EXIT_X86_RDMSR else "wrmsr"
            self._count(self.detail, f"{kind}:{index:#x}")
            # Success, and a read gives 0 (error 0 means no #GP).
            page[KVM_RUN_UNION] = 0
            U64.pack_into(page, KVM_RUN_MSR_DATA, 0)
        elif reason == KVM_EXIT_HLT:
            return False
        elif reason != KVM_EXIT_INTR:
            self.error = (f"unexpected exit "
                          f"{KVM_EXIT_NAMES.get(reason, str(reason))}")
            return False
        return True

    def _run_vcpu(self):
        # The loop is lean because in the lab every exit to user space costs
        # enough already; throughput mode measures it.
        fd, page, stop = self.fd, self.run_page, self.stop
        timed = self.seconds is not None
        start = time.monotonic()
        deadline = start + self.seconds if timed else None
        names = KVM_EXIT_NAMES
        if timed:
            self.run_since = start
        while True:
            try:
                ioctl(fd, KVM_RUN)
            except InterruptedError:
                pass            # a signal; KVM set exit_reason to INTR
            if timed and page[KVM_RUN_IMMEDIATE_EXIT]:
                self.error = (f"KVM_RUN did not come back within "
                              f"{self.run_limit:g} s: the guest ran on inside "
                              f"KVM, never exiting to user space")
                break
            reason = U32.unpack_from(page, KVM_RUN_EXIT_REASON)[0]
            name = names.get(reason, str(reason))
            self.exits[name] = self.exits.get(name, 0) + 1
            if timed and reason == KVM_EXIT_IO:
                # Stopping only here keeps every count exact in timed mode.
                now = time.monotonic()
                if now >= deadline or stop.is_set():
                    break
                self.run_since = now
                continue        # the OUT has completed; nothing to emulate
            if timed and reason != KVM_EXIT_INTR:
                self.error = f"unexpected exit {name}"
                break
            if not timed and not self._user_exit(reason):
                break
        self.elapsed = time.monotonic() - start
        self.run_since = None

    def expected(self):
        """Exit counts the kvm_exit tracepoint must show for this thread
        (SVM names, as before --do)."""
        if self.seconds is None:
            return self.program.legacy_expected()
        io = self.exits.get("IO", 0)     # known only afterwards
        rounds = self.cr4 * io
        return {"IOIO": io, "READ_CR4": rounds, "WRITE_CR4": rounds,
                "HLT": 0}

    def problems(self):
        if self.error:
            return [self.error]
        if self.seconds is not None:
            return []
        if self.exits.get("HLT") != 1:
            return ["did not halt"]
        return self.user_problems()

    def report(self, done):
        entry = {"index": self.index, "tid": self.tid, "comm": self.name,
                 "cr4": self.cr4}
        if self.seconds is None:
            entry["io"] = sum(s.count for s in self.program.steps
                              if s.source == "--io")
            entry["expected"] = self.expected()
            entry["program"] = [f"{s.text}:{s.count}"
                                for s in self.program.steps]
            entry["expected_events"] = self.program.expected(self.isa)
            entry["expected_user"] = self.program.user_detail()
        if done:
            entry["expected"] = self.expected()
            entry["user_exits"] = dict(self.exits)
            entry["seconds"] = round(self.elapsed, 6)
            if self.elapsed > 0:
                entry["io_exits_per_s"] = round(
                    self.exits.get("IO", 0) / self.elapsed, 1)
            if self.seconds is None:
                entry["user_detail"] = dict(self.detail)
            entry["errors"] = self.problems()
        return entry


class RunWatch(threading.Thread):
    """Timed mode: ends any vCPU's KVM_RUN that has not come back within
    `limit` seconds (see VcpuThread.run_since)."""

    SIGNAL = signal.SIGUSR1

    def __init__(self, vcpus, limit):
        super().__init__(name="run watch", daemon=True)
        self.vcpus, self.limit = vcpus, limit
        self.done = threading.Event()
        # A handler, so that the signal interrupts KVM_RUN (EINTR) and does
        # not end the process; Python runs it, harmlessly, in main().
        signal.signal(self.SIGNAL, lambda *_: None)

    def run(self):
        while not self.done.wait(min(1.0, self.limit / 4)):
            now = time.monotonic()
            for v in self.vcpus:
                since = v.run_since
                if since is not None and now - since > self.limit and \
                        not v.run_page[KVM_RUN_IMMEDIATE_EXIT]:
                    # KVM checks it on entry: no signal is lost to a thread
                    # just about to enter KVM_RUN.
                    v.run_page[KVM_RUN_IMMEDIATE_EXIT] = 1
                    signal.pthread_kill(v.ident, self.SIGNAL)


# --- command line ------------------------------------------------------------

def count_list(text):
    values = [int(v, 0) for v in text.split(",")]
    if any(not 0 <= v < 2 ** 32 for v in values):
        raise argparse.ArgumentTypeError("counts must fit in 32 bits")
    return values


def do_step(text, kinds=KINDS):
    try:
        return parse_step(text, kinds)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def per_vcpu(values, vcpus, option):
    if len(values) == 1:
        return values * vcpus
    if len(values) != vcpus:
        sys.exit(f"guest.py: {option} has {len(values)} values for "
                 f"{vcpus} vCPUs")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="--do KIND[:KEY]:COUNT, KIND one of: " + ", ".join(KINDS) +
        " (see the module's docstring)")
    p.add_argument("--vcpus", type=int,
                   help="number of vCPUs (default: length of --io/--cr4 "
                        "lists or highest --do vCPU + 1, else 1)")
    p.add_argument("--io", type=count_list, default=[1],
                   help="OUT exits (port 0x510, 1 byte) per vCPU: one value "
                        "or a comma list; first in the program")
    p.add_argument("--cr4", type=count_list, default=[0],
                   help="CR4 read+write pairs per vCPU: one value or a list")
    p.add_argument("--do", type=do_step, action="append", default=[],
                   metavar="[VCPUS@]KIND[:KEY]:COUNT",
                   help="then do this COUNT times (repeatable, in order); "
                        "VCPUS: comma list of vCPU indexes (default all)")
    p.add_argument("--isa", choices=("svm", "vmx"),
                   help="exit codes and hypercall instruction (default: "
                        "this CPU's, from /proc/cpuinfo)")
    p.add_argument("--seconds", type=float,
                   help="throughput mode: loop this long (inf: until SIGINT)")
    p.add_argument("--run-limit", type=float, default=60,
                   help="throughput mode: end a KVM_RUN not back after this "
                        "many seconds, as an error (default 60)")
    p.add_argument("--thread-name", default="CPU {n}/KVM",
                   help="vCPU thread names, {n} the vCPU index (default: "
                        "QEMU's 'CPU {n}/KVM'; another VMM's names test "
                        "what does not rely on them)")
    add_report_options(p)
    args = p.parse_args(argv)
    if args.vcpus is None:
        named = [max(where) + 1 for where, _ in args.do if where]
        args.vcpus = max([len(args.io), len(args.cr4)] + named)
    if args.vcpus < 1:
        p.error("--vcpus must be at least 1")
    if args.seconds is not None and args.do:
        p.error("--do needs counted mode (no --seconds)")
    check_do_vcpus(p, args)
    args.io = per_vcpu(args.io, args.vcpus, "--io")
    args.cr4 = per_vcpu(args.cr4, args.vcpus, "--cr4")
    args.programs = [program_of(args, i) for i in range(args.vcpus)]
    owners = {}
    for i, prog in enumerate(args.programs):
        for page in prog.mmio_pages():
            if owners.setdefault(page, i) != i:
                p.error(f"MMIO page {page * PAGE:#x} is used by vCPUs "
                        f"{owners[page]} and {i}: give each its own page")
    args.isa = args.isa or host_isa()
    return args


def add_report_options(p):
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--hold",
                   help="wait before running until this file exists; for a "
                        "FIFO until a byte arrives; '-': a line on stdin")


def check_do_vcpus(p, args):
    """Each --do's vCPUs exist."""
    for where, step in args.do:
        if where and max(where) >= args.vcpus:
            p.error(f"--do {step.text}: no vCPU {max(where)} "
                    f"({args.vcpus} vCPUs)")


def program_of(args, i):
    """vCPU i's steps: --io OUTs, --cr4 round trips, then its --do steps."""
    steps = [Step("out", {"port": IO_PORT, "size": 1}, args.io[i],
                  f"out:{IO_PORT:#x}/1", "--io"),
             Step("cr4", {}, args.cr4[i], "cr4", "--cr4")]
    steps += [s for where, s in args.do if where is None or i in where]
    return Program(steps)


def wait_for_release(hold):
    if hold == "-":
        sys.stdin.readline()
    elif os.path.exists(hold) and stat.S_ISFIFO(os.stat(hold).st_mode):
        with open(hold, "rb") as fifo:
            fifo.read(1)
    else:
        while not os.path.exists(hold):
            time.sleep(0.01)


def write_report(path, report):
    """Replace the report atomically: a poller may read it at any moment."""
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def make_report(args, vcpus, state):
    return {"pid": os.getpid(), "state": state,
            "mode": "counted" if args.seconds is None else "timed",
            "isa": args.isa,
            "svm_exit_codes": SVM_EXIT_CODES,
            "exit_codes": EXIT_CODES[args.isa],
            "vcpus": [v.report(state == "done") for v in vcpus]}


def join_all(threads, stop):
    # Joining with a timeout keeps the main thread able to take SIGINT.
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join()


def announce_ready(prog, path, report, hold):
    """Write the "ready" report, say so, then wait for the release (--hold):
    a tracer attaches in between."""
    write_report(path, report)
    tids = [v["tid"] for v in report["vcpus"]]
    print(f"{prog}: pid {os.getpid()}: {len(tids)} vCPUs ready, tids "
          f"{tids}", flush=True)
    if hold:
        wait_for_release(hold)


def print_problems(prog, report):
    """Each vCPU's errors on stderr; the exit status: 1 if there were any."""
    problems = [f"vCPU {v['index']}: {e}" for v in report["vcpus"]
                for e in v["errors"]]
    for p in problems:
        print(f"{prog}: {p}", file=sys.stderr)
    return 1 if problems else 0


def make_vm(args):
    vm = Vm(args.vcpus,
            user_msrs=any(p.needs("rdmsr", "wrmsr") for p in args.programs))
    if args.seconds is not None:
        vm.timed_code = vm.place_code(TIMED_CODE)
    return vm


def main(argv=None):
    args = parse_args(argv)
    try:
        vm = make_vm(args)
        ready = threading.Barrier(args.vcpus + 1)
        go, stop = threading.Event(), threading.Event()
        vcpus = [VcpuThread(vm, i, args.programs[i], args.cr4[i],
                            args.seconds, ready, go, stop, args.isa,
                            args.thread_name)
                 for i in range(args.vcpus)]
    except (OSError, RuntimeError) as e:
        print(f"guest.py: {e}", file=sys.stderr)
        return 1
    for v in vcpus:
        v.run_limit = args.run_limit
        v.start()
    watch = RunWatch(vcpus, args.run_limit) if args.seconds is not None \
        else None
    if watch:
        watch.start()
    ready.wait()                # every vCPU thread now has its tid and comm
    announce_ready("guest.py", args.report,
                   make_report(args, vcpus, "ready"), args.hold)
    go.set()
    join_all(vcpus, stop)
    if watch:
        watch.done.set()
    report = make_report(args, vcpus, "done")
    write_report(args.report, report)
    for v in report["vcpus"]:
        rate = (f", {v['io_exits_per_s']} IO exits/s"
                if args.seconds is not None and "io_exits_per_s" in v else "")
        print(f"guest.py: pid {os.getpid()} vCPU {v['index']} tid "
              f"{v['tid']}: user exits {v['user_exits']}{rate}", flush=True)
    return print_problems("guest.py", report)


if __name__ == "__main__":
    sys.exit(main())
