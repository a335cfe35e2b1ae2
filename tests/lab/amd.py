"""The AMD lab: Debian's 6.1 kernel under QEMU's emulator with an AMD CPU.

QEMU's emulator (TCG, "-cpu max") has SVM, so kvm_amd runs inside the lab
and kvm:kvm_exit fires for the guests started there (tests/lab/guest.py).
virtme-ng boots it: the lab sees this machine's files at the same paths,
read-only but for `outdir` (9p), so nothing is copied in or out and the
init's markers are seen as they are written.  The rest is core.py's.

    from amd import AmdLab
    rc, output = AmdLab().run(cmd, timeout=300, outdir=str(tmp_path))
"""

import json
import os
import socket
import subprocess
import time

from core import REPO, LAB_DIR, Lab, Machine, run_setup, tail

VENV = os.environ.get("KVMEXIT_LAB_VENV", "/opt/kvmexit-lab/venv")
MEMORY = "3G"
# vng sends the serial console to /dev/null.  The kernel log goes to a
# second serial port (an early console kept for good) that QEMU writes to a
# file, so that a lab that fails shows what its kernel said; sysrq lets a
# frozen lab be asked for its CPUs' and blocked tasks' backtraces.
KERNEL_LOG_ARGS = "earlycon=uart8250,io,0x2f8,115200 keep_bootcon " \
    "loglevel=7 sysrq_always_enabled"


class AmdLab(Lab):
    setup_script = os.path.join(LAB_DIR, "setup.sh")
    # QEMU's emulator, one host thread for all emulated CPUs: with a thread
    # per CPU (QEMU's default), a CPU idle in HLT sometimes missed its
    # wake-up and the lab froze (README: the lab).  It leaves the other
    # host CPU to the Intel lab.  "max": every feature, SVM included.
    accel = "tcg,thread=single"
    cpu = "max"
    # Kernel arguments beyond KERNEL_LOG_ARGS.
    kernel_args = ""

    def __init__(self, cpus=2):
        super().__init__()
        self.cpus = cpus

    def setup(self):
        return run_setup(self.setup_script)

    def launch(self, kernel, init_command, run):
        argv = self.vng_argv(kernel, run.outdir, init_command, run.work)
        # vng finds its helpers (virtme-run...) on PATH.
        env = dict(os.environ, PATH=os.path.join(VENV, "bin") + ":" +
                   os.environ.get("PATH", "/usr/bin:/bin"))
        # A pipe, not a file: vng's output to a file comes out garbled.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
        return Machine(proc, proc.stdout)

    def vng_argv(self, kernel, outdir, init_command, work):
        """`work`: this machine's directory for the kernel log and QEMU's
        monitor socket (see KERNEL_LOG_ARGS)."""
        qemu = [f"-cpu {self.cpu}", f"-accel {self.accel}",
                f"-serial file:{os.path.join(work, 'kernel.log')}",
                f"-qmp unix:{os.path.join(work, 'qmp')},server=on,wait=off"]
        return [os.path.join(VENV, "bin", "vng"), "-r", kernel,
                # The host's KVM cannot run this kernel; QEMU's emulator
                # can, and it emulates the SVM the lab's own KVM needs.
                # 9p, as virtio-fs would need a virtiofsd.
                "--disable-kvm", "--force-9p", "-p", str(self.cpus),
                "-m", MEMORY, "--qemu-opts=" + " ".join(qemu),
                f"--append={KERNEL_LOG_ARGS} {self.kernel_args}".rstrip(),
                f"--rwdir={outdir}", "--cwd", REPO, "--exec", init_command]

    def diagnose(self, run, wait=5):
        """Have the frozen lab's kernel log its CPUs' and blocked tasks'
        backtraces (sysrq l and w, typed on its keyboard through QEMU's
        monitor); return where its CPUs are, or why QEMU did not say."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(os.path.join(run.work, "qmp"))
                qmp = sock.makefile("rw")
                qmp.readline()                  # the greeting
                qmp_command(qmp, "qmp_capabilities")
                for letter in "lw":
                    qmp_command(qmp, "send-key", keys=[
                        {"type": "qcode", "data": key}
                        for key in ("alt", "sysrq", letter)])
                time.sleep(wait)        # for the backtraces to be logged
                registers = qmp_command(
                    qmp, "human-monitor-command",
                    **{"command-line": "info registers -a"})
        except (OSError, ValueError) as e:
            return f"QEMU's monitor did not answer ({e})"
        rips = [line.split()[0] for line in registers.splitlines()
                if line.startswith("RIP=")]
        return "its CPUs at " + (", ".join(rips) or "(no registers)")

    def kernel_log(self, run, lines=120):
        log = tail(os.path.join(run.work, "kernel.log"), lines)
        if log is None:
            return "(no kernel log: QEMU did not start)"
        return "its kernel log ends:\n" + log


def qmp_command(qmp, name, **arguments):
    """Send one QMP command; return its result (skipping QEMU's events)."""
    qmp.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
    qmp.flush()
    while True:
        line = qmp.readline()
        if not line:
            raise ValueError("QEMU closed its monitor")
        reply = json.loads(line)
        if "error" in reply:
            raise ValueError(reply["error"].get("desc", reply["error"]))
        if "return" in reply:
            return reply["return"]
