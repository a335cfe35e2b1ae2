"""Fixtures for kvmexit's tests; the helpers they share are in the
package tests/helpers.

Unit tests (args, proc, report, tables) need neither root nor bcc.  Kernel
and CLI tests need both; they run as root in CI and never skip: a missing
bcc or kernel header is a failure, not a skip."""

import fcntl
import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import KVM_CREATE_VCPU, KVM_CREATE_VM, FakeProc  # noqa: E402
from helpers import kvmexit  # noqa: E402
from helpers.bpfrun import PinnedThread  # noqa: E402

# The session's time per test file, at the end of its log.
pytest_plugins = ("helpers.file_times",)


@pytest.fixture
def fake_proc(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    # Entries of the real /proc that are not processes.
    (proc / "self").mkdir()
    (proc / "sys").mkdir()
    return FakeProc(proc)


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
