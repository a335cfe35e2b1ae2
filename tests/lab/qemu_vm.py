"""A real QEMU (Debian's qemu-system-x86_64, KVM-accelerated in the lab)
running a tiny firmware made here, with exits known in advance.

The firmware is a 64 KiB -bios image in real mode.  The BSP (reset vector
at 0xFFF0) turns on x2APIC and wakes every AP at once with an INIT and a
SIPI to all but itself (wrmsr 0x830); the SIPI vector 0xF0 starts the APs
at the image's first byte, where the BSP goes too.  There each vCPU reads
its APIC ID (CPUID 1), which under QEMU is its index n, and makes its own
exits:
  - 20 + 3n one-byte writes to port 0x510 (IOIO, out to QEMU: no device);
  - 1 + n % 4 reads of MSR 0x1b (IA32_APIC_BASE; MSR, handled in KVM).
An AP then counts itself done (lock inc at 0:0600) and halts; the BSP
waits for the 10 others, lingers 3 x 2^32 TSC cycles (a VM that ends
within a second of its first exit is named by its process name, not its
-name) and writes 0 to port 0xf4 (isa-debug-exit), so QEMU ends by itself
with status 1.  The BSP's own extra exits: one more read and one write
of MSR 0x1b, two writes of MSR 0x830, one out to 0xf4.

    /usr/bin/python3 tests/lab/qemu_vm.py NAME REPORT.json

runs one (held with -S until its vCPU threads are listed, then started
over QMP) and writes REPORT: its pid, status and {tid, index} per vCPU.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

VCPUS = 11
PORT = 0x510
MSR = 0x1b
DONE = 0x600                    # the APs' done count, in low RAM
# How long the BSP lingers once all are done, in 2^32 TSC cycles (RDTSC
# makes no exit): 3-6 s at 2-4 GHz, so that the VM lives past kvmexit's
# one-second tick, which reads its name (-name) from its command line.
LINGER = 3
QEMU = "/usr/bin/qemu-system-x86_64"
EXIT_STATUS = 1                 # isa-debug-exit: (0 << 1) | 1
TIMEOUT = 120


def outs(n):
    return 20 + 3 * n


def msr_reads(n):
    return 1 + n % 4


def expected(n):
    """{(kind, key, op): count} of vCPU n's port and MSR exits, keyed as
    kvmexit's --detail keeps them."""
    want = {("port", PORT, "out"): outs(n),
            ("msr", MSR, "read"): msr_reads(n)}
    if n == 0:
        want[("msr", MSR, "read")] += 1
        want[("msr", MSR, "write")] = 1
        want[("msr", 0x830, "write")] = 2
        want[("port", 0xf4, "out")] = 1
    return want


# -- The firmware: 16-bit code, assembled by hand (each line says what) ---

def u16(v):
    return v.to_bytes(2, "little")


def u32(v):
    return v.to_bytes(4, "little")


def common():
    """Every vCPU's code, at offset 0 (the APs' SIPI entry)."""
    code = bytearray()
    code += b"\xfa"                             # cli
    code += b"\x31\xc0\x8e\xd8"                 # xor ax,ax; mov ds,ax
    code += b"\x66\xb8" + u32(1) + b"\x0f\xa2"  # mov eax,1; cpuid
    code += b"\x66\xc1\xeb\x18"                 # shr ebx,24: bx = APIC ID
    code += b"\x89\xd8\x01\xc0\x01\xd8"         # ax = 3 * bx
    code += b"\x05" + u16(20) + b"\x89\xc1"     # add ax,20; mov cx,ax
    code += b"\xba" + u16(PORT)                 # mov dx,PORT
    code += b"\xee\xe2\xfd"                     # 1: out dx,al; loop 1b
    code += b"\x89\xdf\x83\xe7\x03\x47"         # mov di,bx; and di,3; inc di
    code += b"\x66\xb9" + u32(MSR) + b"\x0f\x32"  # 2: mov ecx,MSR; rdmsr
    code += b"\x4f\x75\xf5"                     # dec di; jnz 2b
    tail = bsp_end()
    code += b"\x85\xdb\x75" + bytes([len(tail)])  # test bx,bx; jnz ap
    code += tail
    code += b"\xf0\xff\x06" + u16(DONE)         # ap: lock inc word [DONE]
    code += b"\xf4\xeb\xfd"                     # 4: hlt; jmp 4b
    return bytes(code)


def bsp_end():
    """The BSP's end: wait for the APs, linger, end QEMU."""
    code = bytearray()
    code += b"\x83\x3e" + u16(DONE) + bytes([VCPUS - 1])  # 3: cmp [DONE],10
    code += b"\x75\xf9"                         # jne 3b
    code += b"\x0f\x31\x89\xd6"                 # rdtsc; mov si,dx
    code += b"\x0f\x31\x29\xf2"                 # 5: rdtsc; sub dx,si
    code += b"\x83\xfa" + bytes([LINGER])       # cmp dx,LINGER
    code += b"\x72\xf7"                         # jb 5b
    code += b"\xba\xf4\x00\xb0\x00\xee"         # mov dx,0xf4; mov al,0; out
    code += b"\xf4"                             # hlt (QEMU has ended)
    return bytes(code)


BSP_START = 0x100


def bsp():
    """The BSP's start: x2APIC on, INIT and SIPI (vector 0xF0, so the APs
    start at 0xF000:0000) to all but itself, then the common code."""
    code = bytearray()
    code += b"\xfa\x31\xc0\x8e\xd8"             # cli; ds = 0
    code += b"\x66\xb9" + u32(MSR) + b"\x0f\x32"  # rdmsr APIC_BASE
    code += b"\x66\x0d" + u32(0xc00) + b"\x0f\x30"  # |= EN|EXTD; wrmsr
    code += b"\x66\xb9" + u32(0x830)            # mov ecx,ICR
    code += b"\x66\x31\xd2"                     # xor edx,edx
    code += b"\x66\xb8" + u32(0xc4500) + b"\x0f\x30"  # INIT, all but self
    code += b"\x66\xb8" + u32(0xc46f0) + b"\x0f\x30"  # SIPI 0xF0, all but self
    here = BSP_START + len(code) + 3
    code += b"\xe9" + u16((0 - here) & 0xffff)  # jmp 0 (common)
    return bytes(code)


def firmware():
    image = bytearray(b"\xf4" * 0x10000)
    body = common()
    assert len(body) <= BSP_START
    image[:len(body)] = body
    start = bsp()
    image[BSP_START:BSP_START + len(start)] = start
    image[0xfff0:0xfff5] = b"\xea" + u16(BSP_START) + u16(0xf000)
    return bytes(image)


# -- Running it ----------------------------------------------------------

def command(name, bios, qmp):
    return [QEMU, "-machine", "pc,accel=kvm", "-smp", str(VCPUS),
            "-m", "16", "-nodefaults", "-display", "none", "-bios", bios,
            "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
            "-name", "guest=%s,debug-threads=on" % name,
            "-S", "-qmp", "unix:%s,server=on,wait=off" % qmp]


def vcpu_threads(pid):
    """{tid: n} of the threads named 'CPU n/KVM'."""
    found = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm.startswith("CPU ") and comm.endswith("/KVM"):
            found[int(tid)] = int(comm[4:-4])
    return found


def qmp_cont(path):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    f = sock.makefile("rw")
    f.readline()                                # the greeting
    for cmd in ("qmp_capabilities", "cont"):
        f.write(json.dumps({"execute": cmd}) + "\n")
        f.flush()
        while "return" not in json.loads(f.readline()):
            pass
    sock.close()


def wait_for(predicate, what, proc):
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("qemu_vm: no %s (QEMU status %s)"
                             % (what, proc.poll()))
        time.sleep(0.1)


def run(name, report):
    work = tempfile.mkdtemp(prefix="qemu-vm-")
    bios = os.path.join(work, "firmware.bin")
    with open(bios, "wb") as f:
        f.write(firmware())
    qmp = os.path.join(work, "qmp.sock")
    proc = subprocess.Popen(command(name, bios, qmp))
    wait_for(lambda: os.path.exists(qmp), "QMP socket", proc)
    wait_for(lambda: len(vcpu_threads(proc.pid)) == VCPUS, "vCPU threads",
             proc)
    threads = vcpu_threads(proc.pid)
    qmp_cont(qmp)
    try:
        status = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        status = "killed"
    with open(report, "w") as f:
        json.dump({"pid": proc.pid, "status": status,
                   "vcpus": [{"tid": tid, "index": n}
                             for tid, n in sorted(threads.items())]}, f)
    return 0 if status == EXIT_STATUS else 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2]))
