"""The arm64 lab: Debian's 6.1 arm64 kernel under QEMU's emulator.

QEMU's emulator runs a "virt" machine whose CPUs start at EL2
(virtualization=on, "-cpu max"), so that kernel runs KVM (built in, VHE)
and kvm:kvm_exit fires for the arm64 guests started there
(tests/lab/arm64_guest.py).  tests/lab/arm64_setup.sh gives the kernel and
an initramfs with an arm64 Debian root (bcc, numpy, the kernel's headers);
its /init mounts two directories of this machine over 9p at the same paths
-- the repository read-only, `outdir` writable -- and runs the init
command, which core.py writes under `outdir`.  So the init's markers are
seen as they are written, and nothing is copied.  The rest is core.py's.

    from arm64 import Arm64Lab
    rc, output = Arm64Lab().run(cmd, timeout=600, outdir=str(tmp_path))
"""

import os
import shlex
import subprocess

from core import REPO, LAB_DIR, Lab, LabError, Machine

MEMORY = "4G"       # the root is an initramfs of about 600 MB


class Arm64Lab(Lab):
    name = "arm64 lab"
    tag = "arm64 lab"
    boot_limit = 420            # s; /init started at 59-149 s here
    # Every feature, EL2 included.  Pointer authentication with QEMU's
    # own algorithm, not the architected QARMA5, which its emulator
    # computes step by step: Debian's arm64 kernel and binaries sign and
    # check return addresses in nearly every function.  The kernel sees
    # the same features (an IMPLEMENTATION DEFINED algorithm); the lab
    # booted about 3 times as fast (README: the arm64 lab).
    cpu = "max,pauth-impdef=on"
    # One host thread for both emulated CPUs, as in the AMD lab (amd.py):
    # no CPU waits on another thread to notice its wake-up, and the lab
    # takes one host CPU, not two, from the labs that run beside it.
    accel = "tcg,thread=single"
    setup_script = os.path.join(LAB_DIR, "arm64_setup.sh")

    def __init__(self, cpus=2):
        super().__init__()
        self.cpus = cpus
        self.initrd = None

    def setup(self):
        """The kernel; the initramfs is kept for launch()."""
        proc = subprocess.run(["/bin/bash", self.setup_script],
                              stdout=subprocess.PIPE, text=True)
        paths = proc.stdout.split()
        if proc.returncode != 0 or len(paths) != 2 or \
                not all(os.path.isfile(p) for p in paths):
            raise LabError(f"{self.setup_script} failed (status "
                           f"{proc.returncode}); see its messages above")
        kernel, self.initrd = paths
        return kernel

    def launch(self, kernel, init_command, run):
        script = os.path.join(run.markers, "init.sh")
        with open(script, "w") as f:
            f.write("#!/bin/sh\nexec " + init_command + "\n")
        os.chmod(script, 0o755)
        argv = self.qemu_argv(kernel, run.outdir, script)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
        return Machine(proc, proc.stdout)

    def qemu_argv(self, kernel, outdir, script):
        for path in (REPO, outdir, script):
            if path != shlex.quote(path):
                raise LabError(f"{path!r}: the arm64 lab's kernel arguments "
                               "take paths without spaces or quotes")
        append = ["console=ttyAMA0", "rdinit=/init", "panic=-1",
                  f"lab.src={REPO}", f"lab.out={outdir}",
                  f"lab.run={script}"]
        return ["qemu-system-aarch64",
                "-M", "virt,virtualization=on,gic-version=3",
                "-accel", self.accel,
                "-cpu", self.cpu, "-smp", str(self.cpus), "-m", MEMORY,
                "-nographic", "-no-reboot",
                "-kernel", kernel, "-initrd", self.initrd,
                "-append", " ".join(append),
                "-virtfs", f"local,path={REPO},mount_tag=src,"
                "security_model=none,readonly=on",
                "-virtfs", f"local,path={outdir},mount_tag=out,"
                "security_model=none"]

    def kernel_log(self, run, lines=120):
        # The kernel logs to the console, which is the output.
        text = run.text().splitlines()[-lines:]
        return "its console ends:\n" + "\n".join(text)
