#!/usr/bin/python3
"""Tiny KVM guests with exactly known VM exits, for testing kvmexit.

Stdlib only: it drives /dev/kvm with raw ioctls, so it runs in the lab
(tests/lab/run) under /usr/bin/python3 with nothing else installed.  It
makes one VM with one thread per vCPU; like QEMU, the threads are named
"CPU <n>/KVM".  Every vCPU runs this 16-bit real-mode code from 0x1000:

    loop N times:  out dx, al           -> 1 IOIO exit each, to user space
    loop M times:  mov eax, cr4
                   mov cr4, eax         -> 1 READ_CR4 + 1 WRITE_CR4 exit each,
                                           handled inside KVM
    hlt                                 -> 1 HLT exit, to user space

so, on AMD (SVM exit codes), each vCPU thread exits exactly N times with
IOIO (0x7b), M times each with READ_CR4 (0x04) and WRITE_CR4 (0x14), and
once with HLT (0x78).  Expect noise on top: NPF (0x400), once for each
vCPU that touches the code page before KVM has mapped it for the VM (one or
two per VM), and INTR (0x60), whenever a host interrupt arrives while a
vCPU is in guest mode (a few per second of running).  Tests must check
those four reasons exactly and ignore the rest.

Usage (as root, where /dev/kvm is a real KVM):

    guest.py --io 100,200,300 --cr4 5 --report r.json --hold go
        3 vCPUs; vCPU i does io[i] OUTs and 5 CR4 round trips.  Writes
        r.json once all vCPU threads exist (state "ready": pid, and per vCPU
        its tid, comm and expected exit counts), then waits until the file
        "go" exists (or, for a FIFO, one byte arrives; "-" means a line on
        stdin) so that a tracer can attach first.  Then it runs, rewrites
        r.json (state "done") adding what user space saw per vCPU, and
        exits 0 if every vCPU halted after exactly its N IO exits.

    guest.py --vcpus 2 --cr4 10 --seconds 5 --report r.json
        Throughput mode: each vCPU loops "10 CR4 round trips, 1 OUT" until
        5 s have passed (inf: until SIGINT), stopping at an IO exit, so
        IOIO == io_exits and READ_CR4 == WRITE_CR4 == 10 * io_exits still
        hold exactly; HLT is 0.  The report has exits per second.

Run it several times for several VMs (processes).
"""

import argparse
import ctypes
import json
import mmap
import os
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


# The kernel checks ioctl sizes; a layout slip would fail loudly anyway, but
# here it fails with a clearer message.
assert ctypes.sizeof(KvmRegs) == 144 and ctypes.sizeof(KvmSregs) == 312

KVM_GET_API_VERSION = _ioc(0, 0x00, 0)
KVM_CREATE_VM = _ioc(0, 0x01, 0)
KVM_GET_VCPU_MMAP_SIZE = _ioc(0, 0x04, 0)
KVM_CREATE_VCPU = _ioc(0, 0x41, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(1, 0x46,
                                  ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_RUN = _ioc(0, 0x80, 0)
KVM_SET_REGS = _ioc(1, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ioc(2, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _ioc(1, 0x84, ctypes.sizeof(KvmSregs))

# struct kvm_run: exit_reason at 8; for KVM_EXIT_IO the union at 32 starts
# with direction (u8), size (u8), port (u16).
KVM_RUN_EXIT_REASON = 8
KVM_RUN_IO_PORT = 34
U32, U16 = struct.Struct("<I"), struct.Struct("<H")

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_INTR = 10
KVM_EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 5: "HLT",
                  6: "MMIO", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR",
                  17: "INTERNAL_ERROR"}

# SVM exit codes of the exits this guest makes (arch/x86/include/uapi/asm/
# svm.h), for whoever compares with the kvm:kvm_exit tracepoint.
SVM_EXIT_CODES = {"READ_CR4": 0x04, "WRITE_CR4": 0x14, "INTR": 0x60,
                  "HLT": 0x78, "IOIO": 0x7b, "NPF": 0x400}

# --- the guest ---------------------------------------------------------------

GUEST_MEM_SIZE = 0x10000
CODE_ADDR = 0x1000
# No in-kernel device is created, so KVM hands every port to user space;
# the number only has to be recognisable.
IO_PORT = 0x510

# Counts come in registers, so all vCPUs share one copy of the code:
# ecx = N OUTs, ebx = M CR4 round trips (assembled with GNU as, .code16).
COUNTED_CODE = bytes.fromhex(
    "6685c9"    # test ecx, ecx
    "7405"      # jz   cr4_part
    "ee"        # io: out dx, al
    "6649"      # dec  ecx
    "75fb"      # jnz  io
    "6685db"    # cr4_part: test ebx, ebx
    "740a"      # jz   done
    "0f20e0"    # cr4: mov eax, cr4
    "0f22e0"    # mov  cr4, eax
    "664b"      # dec  ebx
    "75f6"      # jnz  cr4
    "f4")       # done: hlt

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

PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def set_thread_name(name):
    """Name the calling OS thread (its comm), as QEMU names vCPU threads."""
    if _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_NAME): " + os.strerror(err))


class Vm:
    """A KVM VM with GUEST_MEM_SIZE bytes of RAM at guest address 0."""

    def __init__(self, code):
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        version = ioctl(self.kvm, KVM_GET_API_VERSION)
        if version != 12:
            raise RuntimeError(f"unexpected KVM API version {version}")
        self.fd = ioctl(self.kvm, KVM_CREATE_VM)
        self.run_size = ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE)
        self.mem = mmap.mmap(-1, GUEST_MEM_SIZE)
        self.mem[CODE_ADDR:CODE_ADDR + len(code)] = code
        region = KvmUserspaceMemoryRegion(
            slot=0, flags=0, guest_phys_addr=0, memory_size=GUEST_MEM_SIZE,
            userspace_addr=ctypes.addressof(
                ctypes.c_char.from_buffer(self.mem)))
        ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)

    def create_vcpu(self, index, regs):
        """Make vCPU `index` start in real mode at CODE_ADDR with `regs`."""
        fd = ioctl(self.fd, KVM_CREATE_VCPU, index)
        sregs = KvmSregs()
        ioctl(fd, KVM_GET_SREGS, sregs)
        # Reset state has CS base 0xffff0000 (the BIOS alias); flatten it.
        sregs.cs.base = 0
        sregs.cs.selector = 0
        ioctl(fd, KVM_SET_SREGS, sregs)
        values = KvmRegs(rip=CODE_ADDR, rflags=2, rdx=IO_PORT, **regs)
        ioctl(fd, KVM_SET_REGS, values)
        run = mmap.mmap(fd, self.run_size, mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE)
        return fd, run


class VcpuThread(threading.Thread):
    """Runs one vCPU until HLT, or in timed mode until the deadline."""

    def __init__(self, vm, index, io, cr4, seconds, ready, go, stop,
                 name="CPU {n}/KVM"):
        super().__init__(name=name.format(n=index), daemon=True)
        self.index, self.io, self.cr4, self.seconds = index, io, cr4, seconds
        self.ready, self.go, self.stop = ready, go, stop
        # The code takes its counts from registers (see COUNTED_CODE).
        if seconds is None:
            regs = {"rcx": io, "rbx": cr4}
        else:
            regs = {"rsi": cr4}
        self.fd, self.run_page = vm.create_vcpu(index, regs)
        self.tid = None
        self.exits = {}         # KVM_EXIT_* name -> count seen by user space
        self.error = None
        self.elapsed = 0.0

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

    def _run_vcpu(self):
        # The loop is lean because in the lab every exit to user space costs
        # enough already; throughput mode measures it.
        fd, page, stop = self.fd, self.run_page, self.stop
        start = time.monotonic()
        deadline = start + self.seconds if self.seconds is not None else None
        io = 0
        while True:
            try:
                ioctl(fd, KVM_RUN)
            except InterruptedError:
                pass            # a signal; KVM set exit_reason to INTR
            reason = U32.unpack_from(page, KVM_RUN_EXIT_REASON)[0]
            if reason == KVM_EXIT_IO:
                io += 1
                if io == 1 and U16.unpack_from(page, KVM_RUN_IO_PORT)[0] \
                        != IO_PORT:
                    self.error = "OUT to an unexpected port"
                    break
                # Stopping only here keeps every count exact in timed mode.
                if deadline is not None and (
                        time.monotonic() >= deadline or stop.is_set()):
                    break
                continue        # the OUT has completed; nothing to emulate
            name = KVM_EXIT_NAMES.get(reason, str(reason))
            self.exits[name] = self.exits.get(name, 0) + 1
            if reason == KVM_EXIT_HLT:
                break
            if reason != KVM_EXIT_INTR:
                self.error = f"unexpected exit {name}"
                break
        self.elapsed = time.monotonic() - start
        if io:
            self.exits = {"IO": io, **self.exits}

    def expected(self):
        """Exit counts the kvm_exit tracepoint must show for this thread."""
        if self.seconds is None:
            io, rounds, hlt = self.io, self.cr4, 1
        else:           # known only afterwards: M round trips per OUT
            io = self.exits.get("IO", 0)
            rounds, hlt = self.cr4 * io, 0
        return {"IOIO": io, "READ_CR4": rounds, "WRITE_CR4": rounds,
                "HLT": hlt}

    def problems(self):
        if self.error:
            return [self.error]
        io = self.exits.get("IO", 0)
        if self.seconds is None:
            if self.exits.get("HLT") != 1:
                return ["did not halt"]
            if io != self.io:
                return [f"{io} IO exits, expected {self.io}"]
        return []

    def report(self, done):
        entry = {"index": self.index, "tid": self.tid, "comm": self.name,
                 "cr4": self.cr4}
        if self.seconds is None:
            entry["io"] = self.io
            entry["expected"] = self.expected()
        if done:
            entry["expected"] = self.expected()
            entry["user_exits"] = dict(self.exits)
            entry["seconds"] = round(self.elapsed, 6)
            if self.elapsed > 0:
                entry["io_exits_per_s"] = round(
                    self.exits.get("IO", 0) / self.elapsed, 1)
            entry["errors"] = self.problems()
        return entry


# --- command line ------------------------------------------------------------

def count_list(text):
    values = [int(v, 0) for v in text.split(",")]
    if any(not 0 <= v < 2 ** 32 for v in values):
        raise argparse.ArgumentTypeError("counts must fit in 32 bits")
    return values


def per_vcpu(values, vcpus, option):
    if len(values) == 1:
        return values * vcpus
    if len(values) != vcpus:
        sys.exit(f"guest.py: {option} has {len(values)} values for "
                 f"{vcpus} vCPUs")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vcpus", type=int,
                   help="number of vCPUs (default: length of --io/--cr4 "
                        "lists, else 1)")
    p.add_argument("--io", type=count_list, default=[1],
                   help="OUT exits per vCPU: one value or a comma list "
                        "(not with --seconds)")
    p.add_argument("--cr4", type=count_list, default=[0],
                   help="CR4 read+write pairs per vCPU: one value or a list")
    p.add_argument("--seconds", type=float,
                   help="throughput mode: loop this long (inf: until SIGINT)")
    p.add_argument("--thread-name", default="CPU {n}/KVM",
                   help="vCPU thread names, {n} the vCPU index (default: "
                        "QEMU's 'CPU {n}/KVM'; another VMM's names test "
                        "what does not rely on them)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--hold",
                   help="wait before running until this file exists; for a "
                        "FIFO until a byte arrives; '-': a line on stdin")
    args = p.parse_args(argv)
    if args.vcpus is None:
        args.vcpus = max(len(args.io), len(args.cr4))
    if args.vcpus < 1:
        p.error("--vcpus must be at least 1")
    args.io = per_vcpu(args.io, args.vcpus, "--io")
    args.cr4 = per_vcpu(args.cr4, args.vcpus, "--cr4")
    return args


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
            "svm_exit_codes": SVM_EXIT_CODES,
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


def main(argv=None):
    args = parse_args(argv)
    vm = Vm(COUNTED_CODE if args.seconds is None else TIMED_CODE)
    ready = threading.Barrier(args.vcpus + 1)
    go, stop = threading.Event(), threading.Event()
    vcpus = [VcpuThread(vm, i, args.io[i], args.cr4[i], args.seconds,
                        ready, go, stop, args.thread_name)
             for i in range(args.vcpus)]
    for v in vcpus:
        v.start()
    ready.wait()                # every vCPU thread now has its tid and comm
    write_report(args.report, make_report(args, vcpus, "ready"))
    print(f"guest.py: pid {os.getpid()}: {args.vcpus} vCPUs ready, tids "
          f"{[v.tid for v in vcpus]}", flush=True)
    if args.hold:
        wait_for_release(args.hold)
    go.set()
    join_all(vcpus, stop)
    report = make_report(args, vcpus, "done")
    write_report(args.report, report)
    problems = [f"vCPU {v['index']}: {e}" for v in report["vcpus"]
                for e in v["errors"]]
    for v in report["vcpus"]:
        rate = (f", {v['io_exits_per_s']} IO exits/s"
                if args.seconds is not None and "io_exits_per_s" in v else "")
        print(f"guest.py: pid {os.getpid()} vCPU {v['index']} tid "
              f"{v['tid']}: user exits {v['user_exits']}{rate}", flush=True)
    for p in problems:
        print(f"guest.py: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
