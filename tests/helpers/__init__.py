"""Everything kvmexit's tests and benchmarks share, in one importable
package: `from helpers import run_tool, FakeProc`, `from helpers import
bpfrun`.  Importing it puts the repository's top directory on sys.path, so
that `import kvmexit` works from any test, benchmark or child process.

    bpfrun       runs a loaded raw tracepoint program with chosen arguments
    kernel_btf   BTF of a kernel package's files

Fixtures stay in tests/conftest.py (pytest finds them there)."""

import os
import subprocess
import sys
import time

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
SCRIPT = os.path.join(ROOT, "kvmexit.py")
# The interpreter bcc (python3-bpfcc) imports under; the python3 first on
# PATH may be another one without it.
SYSTEM_PYTHON = "/usr/bin/python3"

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import kvmexit  # noqa: E402

KVM_CREATE_VM, KVM_CREATE_VCPU = 0xAE01, 0xAE41


#
# A fake /proc tree
#
class FakeProc:
    """Builds PID/status, PID/task/TID/comm, TID/status and PID/fd/N as
    /proc has them, under a temporary directory."""

    def __init__(self, root):
        self.root = str(root)

    @property
    def path(self):
        return self.root

    def process(self, pid, threads, vcpu_fds=()):
        """threads: {tid: comm}; the leader (tid == pid) is added with the
        name of the first thread if missing.  vcpu_fds: vCPU ids the
        process holds KVM fds for."""
        threads = dict(threads)
        threads.setdefault(pid, "qemu-system-x86")
        for tid, comm in threads.items():
            task = os.path.join(self.root, str(pid), "task", str(tid))
            os.makedirs(task, exist_ok=True)
            with open(os.path.join(task, "comm"), "w") as f:
                f.write(comm + "\n")
            status = "Name:\t%s\nUmask:\t0022\nState:\tS (sleeping)\n" \
                     "Tgid:\t%d\nNgid:\t0\nPid:\t%d\nPPid:\t1\n" % (
                         comm, pid, tid)
            with open(os.path.join(task, "status"), "w") as f:
                f.write(status)
            # /proc/TID exists for every thread, hidden from listings.
            top = os.path.join(self.root, str(tid))
            os.makedirs(top, exist_ok=True)
            with open(os.path.join(top, "status"), "w") as f:
                f.write(status)
        fd_dir = os.path.join(self.root, str(pid), "fd")
        os.makedirs(fd_dir, exist_ok=True)
        links = ["/dev/null", "/dev/kvm", "anon_inode:kvm-vm",
                 "socket:[12345]"]
        links += ["anon_inode:kvm-vcpu:%d" % v for v in vcpu_fds]
        for n, target in enumerate(links):
            os.symlink(target, os.path.join(fd_dir, str(n)))
        return self


#
# Running the script
#
def run_tool(args, python=SYSTEM_PYTHON, script=SCRIPT, timeout=60,
             prefix=(), **kw):
    """Run kvmexit as a command; `python=None` runs the script itself
    (through its #! line)."""
    argv = list(prefix) + ([python] if python else []) + [script] + \
        [str(a) for a in args]
    return subprocess.run(argv, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=timeout, **kw)


def assert_one_error_line(result, line, rc=1):
    """kvmexit's own errors: exactly one stderr line, nothing on stdout,
    no traceback."""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [line], result.stderr
    assert result.stdout == ""
    assert result.returncode == rc


def first_line(context, duration=None):
    if duration:
        return "Display kvm exit reasons and statistics for %s after " \
               "sleeping %d secs." % (context, duration)
    return "Display kvm exit reasons and statistics for %s... Hit " \
           "Ctrl-C to end." % context


HEADER_ALL = "PID      TID      KVM_EXIT_REASON                     COUNT"
HEADER_COLLAPSED = "KVM_EXIT_REASON                     COUNT"
HEADER_ALLTIDS = "TID      KVM_EXIT_REASON                     COUNT"
HEADER_TIDS = "TIDS     KVM_EXIT_REASON                     COUNT"


def text_lines(*lines):
    """Lines as print() writes them."""
    return "".join(line + "\n" for line in lines)


def row(*fields):
    """A report row in bcc's widths: [%-8u ...] %-35s %-8u."""
    *threads, name, count = fields
    return "".join("%-8u " % t for t in threads) + \
        "%-35s %-8u" % (name, count)


#
# Reports and /proc, as kvmexit sees them
#
def print_report(selection, snap, names, out=None):
    """The text report of one snapshot, as kvmexit prints it."""
    kvmexit.TextReport(selection, names, out=out or sys.stdout).report(
        snap, None, time.time())


def program(max_threads, layout, features=()):
    """A kvmexit.Program of the raw-old probe over all threads."""
    return kvmexit.Program(kvmexit.Probe("raw-old", "test"),
                           kvmexit.Selection("all threads", "all"),
                           max_threads, layout, features)


def count_vcpus(proc="/proc"):
    """How many vCPUs all processes hold open now."""
    return sum(kvmexit.vmm_processes(proc).values())
