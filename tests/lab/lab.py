"""Run commands in the kvmexit lab: a VM whose KVM really fires kvm_exit.

The lab boots Debian's 6.1 kernel with virtme-ng under QEMU's emulator
(TCG, "-cpu max": an AMD CPU with SVM), so kvm_amd runs inside it and
kvm:kvm_exit fires for the guests started there (see tests/lab/guest.py).
The lab sees this machine's files at the same paths, but only `outdir`
is shared writable: other writes land in scratch layers that vanish with
the lab.  A command runs as root, from the repository's
top directory, with tracefs mounted, kvm_amd loaded, /dev/kvm working and
kernel headers where bcc looks for them.

From pytest (runs under /usr/bin/python3):

    from lab import run_in_lab, LabError
    rc, output = run_in_lab(["/usr/bin/python3", "kvmexit.py", "-h"],
                            timeout=300, outdir=str(tmp_path))

`cmd` is an argv list, or one string for /bin/sh.  Returns the command's
exit status and its output (stdout and stderr together; also echoed live to
stdout unless quiet=True).  Raises LabError, never skips, when the lab
cannot be set up, does not boot, fails its checks or runs out of time, and
LabFrozen when it froze (see BOOT_LIMIT and FROZEN_AFTER); the message ends
with the lab kernel's log.
From a shell: tests/lab/run.

Run as a script inside the lab (`lab.py guest ...`) this module is also
the lab's first process: it makes those checks and then runs the command.
"""

import codecs
import fcntl
import json
import os
import select
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(LAB_DIR))
SETUP = os.path.join(LAB_DIR, "setup.sh")
VENV = os.environ.get("KVMEXIT_LAB_VENV", "/opt/kvmexit-lab/venv")
# Inside the lab only Debian's interpreter has bcc; use it for everything.
GUEST_PYTHON = "/usr/bin/python3"
TRACEFS = "/sys/kernel/tracing"
MEMORY = "3G"
# Time `timeout` grants QEMU between SIGTERM and SIGKILL.
KILL_GRACE = 10
# The lab writes a heartbeat marker every HEARTBEAT seconds while the
# command runs.  Under QEMU's emulator the lab's whole kernel has been seen
# to stop (every process at once, its vCPUs still spinning) a few times in
# a day; with no heartbeat for FROZEN_AFTER seconds the lab is stopped and
# reported frozen rather than left to run out its timeout.
HEARTBEAT = 5
FROZEN_AFTER = 120
# A boot takes 20-60 s.  One in CI printed nothing for 30 min, so a lab not
# ready after BOOT_LIMIT s has frozen while booting; as its command has not
# started, it is booted again once.
BOOT_LIMIT = 300
# vng sends the serial console to /dev/null.  The kernel log goes to a
# second serial port (an early console kept for good) that QEMU writes to a
# file, so that a lab that fails shows what its kernel said; sysrq lets a
# frozen lab be asked for its CPUs' and blocked tasks' backtraces.
KERNEL_LOG_ARGS = "earlycon=uart8250,io,0x2f8,115200 keep_bootcon " \
    "loglevel=7 sysrq_always_enabled"


class LabError(Exception):
    """The lab could not run the command; `output` has what it printed."""

    def __init__(self, message, output=""):
        super().__init__(message)
        self.output = output


class LabFrozen(LabError):
    """The lab's kernel stopped running anything: it did not finish booting,
    or no heartbeat came while the command ran (`booted`)."""

    def __init__(self, message, output="", booted=True):
        super().__init__(message, output)
        self.booted = booted


# --- host side ---------------------------------------------------------------

def setup(script=SETUP):
    """Install what is missing (fast when nothing is); return the kernel
    the setup script prints (the Intel lab passes its own script)."""
    proc = subprocess.run(["/bin/bash", script], stdout=subprocess.PIPE,
                          text=True)
    kernel = proc.stdout.strip()
    if proc.returncode != 0 or not os.path.isfile(kernel):
        raise LabError(f"{script} failed (status {proc.returncode}); "
                       "see its messages above")
    return kernel


def shell_command(cmd):
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


def vng_argv(kernel, cpus, outdir, guest_cmd, host_dir):
    """`host_dir`: this machine's directory for the kernel log and QEMU's
    monitor socket (see KERNEL_LOG_ARGS)."""
    return [os.path.join(VENV, "bin", "vng"), "-r", kernel,
            # The host's KVM cannot run this kernel; QEMU's emulator can,
            # and it emulates the SVM the lab's own KVM needs.  9p, as
            # virtio-fs would need a virtiofsd.
            "--disable-kvm", "--force-9p", "-p", str(cpus), "-m", MEMORY,
            "--qemu-opts=-cpu max"
            f" -serial file:{os.path.join(host_dir, 'kernel.log')}"
            f" -qmp unix:{os.path.join(host_dir, 'qmp')},server=on,wait=off",
            f"--append={KERNEL_LOG_ARGS}",
            f"--rwdir={outdir}", "--cwd", REPO, "--exec", guest_cmd]


def stream(argv, echo, env, stalled=lambda: False):
    """Run argv, copying its output to `echo` as it comes; return (exit
    status, output).  Stops it if stalled() says so (asked every few
    seconds), and then the status is None."""
    chunks = []
    # Chunks can split a UTF-8 sequence; the decoder carries it over.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    # A pipe, not a file: vng's output to a file comes out garbled.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=REPO, env=env)
    stopped, checked = False, time.monotonic()
    try:
        while True:
            readable = select.select([proc.stdout], [], [], HEARTBEAT)[0]
            # Also while output comes: a stuck kernel can still print.
            if time.monotonic() - checked >= HEARTBEAT:
                checked = time.monotonic()
                if stalled():
                    stopped = True      # the finally below stops it
                    break
            if not readable:
                continue
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                break
            chunks.append(data)
            if echo is not None:
                echo.write(decoder.decode(data))
                echo.flush()
        rc = None if stopped else proc.wait()
    finally:
        # `timeout` runs vng in a process group of its own, out of reach
        # of a Ctrl-C; stopping `timeout` stops the whole group, QEMU too.
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        proc.stdout.close()
    output = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    return rc, output


def read_marker(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def run_in_lab(cmd, timeout, outdir, cpus=2, quiet=False):
    """Run `cmd` in a freshly booted lab; return (exit status, output).

    `timeout` (seconds) bounds boot, command and shutdown, not the one-time
    install by setup.sh.  `outdir` is created if needed and is writable from
    both sides at the same path.  Unless `quiet`, the output is also copied
    to sys.stdout as it comes, with a last line of timings.  A lab that
    freezes while booting is booted again, once (see BOOT_LIMIT).
    """
    # sys.stdout now, not at import: pytest swaps it per test.
    echo = None if quiet else sys.stdout
    kernel = setup()
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    try:
        return boot_and_run(cmd, kernel, timeout, outdir, cpus, echo)
    except LabFrozen as e:
        if e.booted:
            raise
        print(f"lab: {e}\nlab: booting it again, once", flush=True)
    return boot_and_run(cmd, kernel, timeout, outdir, cpus, echo)


def boot_and_run(cmd, kernel, timeout, outdir, cpus, echo):
    # The lab reports how it went through files here, not through output
    # that the command could imitate or interleave with.
    markers = tempfile.mkdtemp(prefix=".lab-", dir=outdir)
    host_dir = tempfile.mkdtemp(prefix="kvmexit-lab-qemu-")
    guest_cmd = shlex.join([GUEST_PYTHON, os.path.join(LAB_DIR, "lab.py"),
                            "guest", markers, os.path.basename(kernel)
                            .removeprefix("vmlinuz-"), shell_command(cmd)])
    argv = ["timeout", f"--kill-after={KILL_GRACE}", str(timeout)] + \
        vng_argv(kernel, cpus, outdir, guest_cmd, host_dir)
    # vng finds its helpers (virtme-run...) on PATH.
    env = dict(os.environ, PATH=os.path.join(VENV, "bin") + ":" +
               os.environ.get("PATH", "/usr/bin:/bin"))
    started = time.monotonic()
    wall_start = time.time()
    why = ""

    def stalled():
        nonlocal why
        why = frozen(markers, wall_start)
        if why:
            why += "; " + ask_frozen_lab(os.path.join(host_dir, "qmp"))
        return bool(why)

    try:
        rc, output = stream(argv, echo, env, stalled)
        log = os.path.join(host_dir, "kernel.log")
        if rc is None:
            booted = os.path.exists(os.path.join(markers, "ready"))
            raise LabFrozen(f"the lab froze: {why}\n{kernel_log(log)}",
                            output, booted)
        try:
            return conclude(rc, output, markers, timeout, wall_start,
                            time.monotonic() - started, echo)
        except LabError as e:
            raise LabError(f"{e}\n{kernel_log(log)}", e.output) from None
    finally:
        remove_markers(markers)
        shutil.rmtree(host_dir)


def frozen(markers, launched):
    """Why the lab looks frozen, or "" (9p gives the markers this machine's
    clock, as time.time() gave `launched`)."""
    def age(name):
        try:
            return time.time() - os.path.getmtime(os.path.join(markers, name))
        except FileNotFoundError:
            return None
    if age("status") is not None or age("error") is not None:
        return ""
    beats = [a for a in (age("heartbeat"), age("ready")) if a is not None]
    if not beats:
        if time.time() - launched > BOOT_LIMIT:
            return f"not booted after {BOOT_LIMIT} s"
        return ""
    if min(beats) > FROZEN_AFTER:
        return f"no heartbeat for {FROZEN_AFTER} s while running the command"
    return ""


def ask_frozen_lab(qmp_path, wait=5):
    """Have the frozen lab's kernel log its CPUs' and blocked tasks'
    backtraces (sysrq l and w, typed on its keyboard through QEMU's
    monitor); return where its CPUs are, or why QEMU did not say."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(qmp_path)
            qmp = sock.makefile("rw")
            qmp.readline()                  # the greeting
            qmp_command(qmp, "qmp_capabilities")
            for letter in "lw":
                qmp_command(qmp, "send-key", keys=[
                    {"type": "qcode", "data": key}
                    for key in ("alt", "sysrq", letter)])
            time.sleep(wait)                # for the backtraces to be logged
            registers = qmp_command(qmp, "human-monitor-command",
                                    **{"command-line": "info registers -a"})
    except (OSError, ValueError) as e:
        return f"QEMU's monitor did not answer ({e})"
    rips = [line.split()[0] for line in registers.splitlines()
            if line.startswith("RIP=")]
    return "its CPUs at " + (", ".join(rips) or "(no registers)")


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


def kernel_log(path, lines=120):
    """The end of the lab kernel's log, to add to a failure's message."""
    try:
        with open(path, errors="replace") as f:
            tail = f.read().replace("\r\n", "\n").splitlines()[-lines:]
    except FileNotFoundError:
        return "(no kernel log: QEMU did not start)"
    return "its kernel log ends:\n" + "\n".join(tail)


def scenario_results(tmp_path_factory, script, results, env,
                     run=run_in_lab, timeout=1800):
    """A test module's lab run: `script OUTDIR` run once in a lab (`run`:
    this one's run_in_lab or the Intel lab's), then the JSON file
    `results` it wrote there.  The environment variable `env`, set to an
    earlier run's OUTDIR, checks that run's results again without booting
    (while working on the tests)."""
    out = os.environ.get(env)
    if not out:
        out = run_test_command(tmp_path_factory, os.path.splitext(results)[0],
                               lambda d: [GUEST_PYTHON, script, d], run,
                               timeout)
    with open(os.path.join(out, results)) as f:
        return json.load(f)


def run_test_command(tmp_path_factory, name, command, run=run_in_lab,
                     timeout=1800):
    """Run `command(OUTDIR)` in a lab, OUTDIR a new directory named after
    `name`; return OUTDIR.  A lab that froze is run again once, in another
    new directory (the first run's files would mislead the second): a
    kvmexit that hung the kernel would freeze it again, and fail.  A lab
    that did not run the command, or a status other than 0, fails the test
    with the end of its output."""
    out = str(tmp_path_factory.mktemp(name))
    started = time.monotonic()
    try:
        try:
            rc, output = run(command(out), timeout=timeout, outdir=out)
        except LabFrozen as e:
            print(f"lab: {e}; booting it again, once", flush=True)
            out = str(tmp_path_factory.mktemp(name))
            rc, output = run(command(out), timeout=timeout, outdir=out)
    except LabError as e:
        raise AssertionError(f"the lab did not run {name}: {e}\n"
                             f"{e.output[-3000:]}") from None
    print(f"lab: {name} in {time.monotonic() - started:.0f} s in all")
    assert rc == 0, f"{name} failed with status {rc}:\n{output[-4000:]}"
    return out


def conclude(rc, output, markers, timeout, wall_start, elapsed, echo):
    """Turn vng's exit and the markers into (status, output) or LabError."""
    ready = read_marker(os.path.join(markers, "ready"))
    failed = read_marker(os.path.join(markers, "error"))
    done = read_marker(os.path.join(markers, "status"))
    if failed is not None:
        raise LabError(f"lab checks failed: {failed['error']}", output)
    if done is None:
        if rc in (124, 137):
            where = "running the command" if ready else "booting"
            raise LabError(f"lab timed out after {timeout} s while {where}",
                           output)
        if ready is None:
            raise LabError(f"lab did not boot (vng exit status {rc}); "
                           f"its output ends:\n{output[-2000:]}", output)
        raise LabError(f"lab died while running the command (vng exit "
                       f"status {rc})", output)
    if echo is not None:
        # The markers' mtimes come from this machine's clock (9p).
        started = os.path.getmtime(os.path.join(markers, "ready"))
        ended = os.path.getmtime(os.path.join(markers, "status"))
        echo.write(f"lab: exit status {done['status']}; command started "
                   f"{started - wall_start:.1f} s after launch (guest uptime "
                   f"{ready['uptime']:.1f} s), ran {ended - started:.1f} s; "
                   f"{elapsed:.1f} s in all\n")
        echo.flush()
    return done["status"], output


def remove_markers(markers):
    for name in os.listdir(markers):
        os.unlink(os.path.join(markers, name))
    os.rmdir(markers)


# --- guest side --------------------------------------------------------------

def write_marker(markers, name, value):
    with open(os.path.join(markers, name), "w") as f:
        json.dump(value, f)


def ensure_tracefs():
    if not os.path.isdir(os.path.join(TRACEFS, "events")):
        subprocess.run(["mount", "-t", "tracefs", "tracefs", TRACEFS],
                       check=True)
    if not os.path.isdir(os.path.join(TRACEFS, "events/kvm/kvm_exit")):
        raise RuntimeError(f"no kvm:kvm_exit tracepoint in {TRACEFS}")


def ensure_kvm():
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    module = "kvm_amd" if "AuthenticAMD" in cpuinfo else "kvm_intel"
    subprocess.run(["modprobe", module], check=True)
    sys.path.insert(0, LAB_DIR)
    import guest    # for its ioctl numbers
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


def beat(markers):
    """The heartbeat run_in_lab watches for (see FROZEN_AFTER)."""
    while True:
        write_marker(markers, "heartbeat", {})
        time.sleep(HEARTBEAT)


def guest_main(markers, release, command):
    """The lab's side of run_in_lab: check the lab, then run the command."""
    try:
        if os.uname().release != release:
            raise RuntimeError(f"running on {os.uname().release}, not in the "
                               f"lab kernel {release}")
        ensure_tracefs()
        ensure_kvm()
        ensure_headers(release)
        os.chdir(REPO)
    except Exception as e:
        print(f"lab: error: {e}", file=sys.stderr, flush=True)
        write_marker(markers, "error", {"error": str(e)})
        return 125
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
    if len(sys.argv) != 5 or sys.argv[1] != "guest":
        sys.exit("usage: lab.py guest MARKER_DIR RELEASE COMMAND "
                 "(the lab's init runs this; use tests/lab/run)")
    sys.exit(guest_main(*sys.argv[2:]))
