"""Shared helpers for kvmexit's tests.

Unit tests (args, proc, report, tables) need neither root nor bcc.  Kernel
and CLI tests need both; they run as root in CI and never skip: a missing
bcc or kernel header is a failure, not a skip."""

import fcntl
import os
import subprocess
import sys
import threading

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SCRIPT = os.path.join(ROOT, "kvmexit.py")
# The interpreter bcc (python3-bpfcc) imports under; the python3 first on
# PATH may be another one without it.
SYSTEM_PYTHON = "/usr/bin/python3"

sys.path[:0] = [ROOT, TESTS]

import kvmexit  # noqa: E402

# Test modules import the helpers below as kvmexit_conftest: the name
# 'conftest' in sys.modules goes to whichever conftest.py pytest loaded
# last (a tests/lab/conftest.py, say).
sys.modules["kvmexit_conftest"] = sys.modules[__name__]


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


@pytest.fixture
def fake_proc(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    # Entries of the real /proc that are not processes.
    (proc / "self").mkdir()
    (proc / "sys").mkdir()
    return FakeProc(proc)


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
    return "".join("%-8u " % t for t in threads) + "%-35s %-8u" % (name,
                                                                    count)


#
# bcc and kernel programs
#
@pytest.fixture(scope="session")
def bcc():
    assert os.geteuid() == 0, "kernel tests run as root (CI does)"
    kvmexit.check_bcc()
    # .ci/install puts headers where bcc looks; kvmexit only checks.
    kvmexit.check_kernel_headers()
    return kvmexit.bcc


@pytest.fixture(scope="session")
def ncpus():
    return kvmexit.possible_cpus()


@pytest.fixture(scope="session")
def cpus_0_1():
    """The kernel tests move threads between CPUs 0 and 1."""
    assert {0, 1} <= os.sched_getaffinity(0), "needs CPUs 0 and 1"
    return 0, 1


@pytest.fixture
def threads():
    """Factory of PinnedThreads, stopped after the test."""
    from bpfrun import PinnedThread
    made = []

    def make(n=1):
        new = [PinnedThread() for _ in range(n)]
        made.extend(new)
        return new[0] if n == 1 else new

    yield make
    for t in made:
        t.stop()


#
# This process as a VMM, on the real /proc
#
@pytest.fixture
def named_threads():
    """Two threads of this process named like QEMU's vCPU threads, the
    lower TID 'CPU 10/KVM', the higher 'CPU 1/KVM' (so a prefix match on
    'CPU 1' would find the wrong one first): {name: tid}."""
    stop = threading.Event()
    tids = []
    ready = threading.Semaphore(0)

    def body():
        tids.append(threading.get_native_id())
        ready.release()
        stop.wait()

    workers = [threading.Thread(target=body, daemon=True) for _ in "ab"]
    for t in workers:
        t.start()
        ready.acquire()
    named = dict(zip(("CPU 10/KVM", "CPU 1/KVM"), sorted(tids)))
    for name, tid in named.items():
        with open("/proc/self/task/%d/comm" % tid, "w") as f:
            f.write(name)
    yield named
    stop.set()
    for t in workers:
        t.join()


KVM_CREATE_VM, KVM_CREATE_VCPU = 0xAE01, 0xAE41


@pytest.fixture
def kvm_vcpus():
    """A VM with vCPUs 0 and 3 in this process: real kvm-vcpu fds."""
    fds = [os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)]
    fds.append(fcntl.ioctl(fds[0], KVM_CREATE_VM, 0))
    for vcpu in (0, 3):
        fds.append(fcntl.ioctl(fds[1], KVM_CREATE_VCPU, vcpu))
    yield
    for fd in reversed(fds):
        os.close(fd)
