#!/usr/bin/python3
"""The lab's first process, in every lab: check the lab, run the command.

    init.py MARKER_DIR RELEASE COMMAND      (a lab's machine runs this)

It checks that it runs on the lab kernel RELEASE, that tracefs has
kvm:kvm_exit, that KVM makes a VM and that bcc finds the kernel headers,
then runs COMMAND with /bin/sh from the repository's top directory.  It
tells the host runner (core.py) how it goes through marker files in
MARKER_DIR: `error` (a check failed: the command does not run), `ready`
(with the guest's uptime), `heartbeat` every HEARTBEAT s while the
command runs, and `status` (the command's exit status) at the end.
"""

import fcntl
import os
import subprocess
import sys
import threading
import time

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, LAB_DIR)
from core import HEARTBEAT, REPO, write_marker  # noqa: E402
import guest  # noqa: E402  (for its ioctl numbers)

TRACEFS = "/sys/kernel/tracing"
LAB_ERROR = 125


def ensure_tracefs():
    if not os.path.isdir(os.path.join(TRACEFS, "events")):
        subprocess.run(["mount", "-t", "tracefs", "tracefs", TRACEFS],
                       check=True)
    if not os.path.isdir(os.path.join(TRACEFS, "events/kvm/kvm_exit")):
        raise RuntimeError(f"no kvm:kvm_exit tracepoint in {TRACEFS}")


def ensure_kvm():
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    # arm64's KVM is built in: /dev/kvm is there from boot.
    if not os.path.exists("/dev/kvm"):
        module = "kvm_amd" if "AuthenticAMD" in cpuinfo else "kvm_intel"
        subprocess.run(["modprobe", module], check=True)
    fd = os.open("/dev/kvm", os.O_RDWR)
    try:
        # Making a VM is the cheap proof that KVM works, not just exists.
        os.close(fcntl.ioctl(fd, guest.KVM_CREATE_VM))
    finally:
        os.close(fd)


def ensure_headers(release):
    """Give bcc /lib/modules/RELEASE/build (guest /lib is a scratch layer)."""
    build = f"/lib/modules/{release}/build"
    if os.path.exists(build):
        return
    headers = f"/usr/src/linux-headers-{release}"
    if not os.path.isdir(headers):
        raise RuntimeError(f"no {build} and no {headers} (linux-headers-amd64 "
                           "must be for the lab kernel)")
    os.symlink(headers, build)
    os.symlink(f"/usr/src/linux-headers-{release.removesuffix('-amd64')}"
               "-common", f"/lib/modules/{release}/source")


def check(release):
    if os.uname().release != release:
        raise RuntimeError(f"running on {os.uname().release}, not in the "
                           f"lab kernel {release}")
    ensure_tracefs()
    ensure_kvm()
    ensure_headers(release)
    os.chdir(REPO)


def beat(markers):
    """The heartbeat the host watches for (Lab.frozen_after)."""
    while True:
        write_marker(markers, "heartbeat", {})
        time.sleep(HEARTBEAT)


def main(markers, release, command):
    os.makedirs(markers, exist_ok=True)
    try:
        check(release)
    except Exception as e:
        print(f"lab: error: {e}", file=sys.stderr, flush=True)
        write_marker(markers, "error", {"error": str(e)})
        return LAB_ERROR
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    write_marker(markers, "ready", {"uptime": uptime})
    threading.Thread(target=beat, args=(markers,), daemon=True).start()
    status = subprocess.run(["/bin/sh", "-c", command]).returncode
    # A command killed by a signal reports it as a shell would.
    status = 128 - status if status < 0 else status
    write_marker(markers, "status", {"status": status})
    return status


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: init.py MARKER_DIR RELEASE COMMAND (a lab's machine "
                 "runs this; use tests/lab/run)")
    sys.exit(main(*sys.argv[1:]))
