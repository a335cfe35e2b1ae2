"""Least privilege: kvmexit as user nobody with only the capabilities it
needs, given by setpriv as a unit's AmbientCapabilities= would.

Found on this kernel (6.18): loading and attaching the program needs
CAP_BPF and CAP_PERFMON; tracefs (where the tracepoint's format is) is
root's, mode 0700, so reading it needs CAP_DAC_READ_SEARCH; another user's
VMM's /proc/PID/fd needs CAP_DAC_READ_SEARCH to be listed and
CAP_SYS_PTRACE for its links (which show the vCPU ids).  (CAP_SYS_RESOURCE
cannot be given here: see FACTS.md.)

Runs as root on the real kernel, never skipped (see conftest.py)."""

import os
import shutil
import subprocess
import tempfile

import pytest

import kvmexit
from helpers import SCRIPT, SYSTEM_PYTHON, first_line, \
    HEADER_ALL, HEADER_COLLAPSED, assert_one_error_line


def as_nobody(caps):
    """setpriv's prefix: user nobody with exactly these capabilities."""
    spec = ",".join(["-all"] + ["+" + c for c in caps])
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=" + spec, "--ambient-caps=" + spec]


@pytest.fixture(scope="module")
def script():
    """The tool where nobody can read it."""
    d = tempfile.mkdtemp(prefix="kvmexit-")
    os.chmod(d, 0o755)
    shutil.copy(SCRIPT, d)
    shutil.copytree(os.path.join(os.path.dirname(SCRIPT), "bpf"),
                    os.path.join(d, "bpf"))
    yield os.path.join(d, "kvmexit.py")
    shutil.rmtree(d)


def run(caps, args, script, timeout=120):
    return subprocess.run(as_nobody(caps) + [SYSTEM_PYTHON, script] +
                          [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout, cwd="/")


NEEDED = ("bpf", "perfmon", "dac_read_search")


def test_runs_as_nobody_with_bpf_perfmon_and_dac_read_search(bcc, script):
    result = run(NEEDED, [1], script)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == first_line("all threads", 1) + "\n" + \
        HEADER_ALL + "\n"


@pytest.mark.parametrize("caps, line", [
    ((), "missing CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN): needed to "
         "load and attach the BPF program"),
    (("bpf", "dac_read_search"), "missing CAP_PERFMON (or CAP_SYS_ADMIN): "
     "needed to load and attach the BPF program"),
    (("bpf", "perfmon"), "cannot search /sys/kernel/tracing for the "
     "kvm_exit tracepoint: missing CAP_DAC_READ_SEARCH"),
])
def test_what_is_missing_is_one_line(bcc, script, caps, line):
    assert_one_error_line(run(caps, [1], script), "kvmexit: " + line)


def test_cap_sys_admin_alone_serves_as_before_5_8(bcc, script):
    result = run(("sys_admin", "dac_read_search"), [1], script)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("caps, last_cap, missing", [
    (1 << kvmexit.CAP_SYS_ADMIN, 40, []),
    (1 << kvmexit.CAP_BPF | 1 << kvmexit.CAP_PERFMON, 40, []),
    (1 << kvmexit.CAP_BPF, 40, ["CAP_PERFMON"]),
    (0, 40, ["CAP_BPF", "CAP_PERFMON"]),
    # Linux 5.4: no CAP_BPF (cap_last_cap 37).
    (1 << kvmexit.CAP_SYS_ADMIN, 37, []),
    (0, 37, ["CAP_SYS_ADMIN"]),
])
def test_missing_capabilities(caps, last_cap, missing):
    assert kvmexit.missing_capabilities(caps, last_cap) == missing


def test_a_kernel_without_cap_bpf_asks_for_cap_sys_admin(tmp_path):
    (tmp_path / "status").write_text("Name:\tkvmexit\nCapEff:\t"
                                     "0000000000000000\n")
    (tmp_path / "cap_last_cap").write_text("37\n")
    with pytest.raises(kvmexit.Error) as exc:
        kvmexit.check_privileges(str(tmp_path / "status"),
                                 str(tmp_path / "cap_last_cap"))
    assert str(exc.value) == "missing CAP_SYS_ADMIN: needed to load and " \
        "attach the BPF program (this kernel has no CAP_BPF)"


#
# Another user's VMM
#
VMM = r"""
import ctypes, fcntl, os, sys
fds = [os.open("/dev/kvm", os.O_RDWR)]
fds.append(fcntl.ioctl(fds[0], 0xAE01, 0))          # KVM_CREATE_VM
for vcpu in (0, 3):
    fds.append(fcntl.ioctl(fds[1], 0xAE41, vcpu))   # KVM_CREATE_VCPU
os.setresgid(1000, 1000, 1000)
os.setresuid(1000, 1000, 1000)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)   # dumpable: /proc/PID is uid 1000's
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def other_users_vmm():
    """A process of uid 1000 holding vCPUs 0 and 3 (real kvm-vcpu fds),
    with no thread named like QEMU's: its vCPUs show only in /proc/PID/fd.
    """
    vmm = subprocess.Popen([SYSTEM_PYTHON, "-c", VMM], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    assert vmm.stdout.readline() == "ready\n"
    yield vmm.pid
    vmm.stdin.close()
    vmm.wait(10)


FDS_HIDDEN = "import sys; sys.path.insert(0, %r); import kvmexit; " \
    "print(kvmexit.fds_hidden(%d), sorted(kvmexit.vcpu_fds(%d)))"


@pytest.mark.parametrize("caps, seen", [
    ((), "True []"),
    (("dac_read_search",), "True []"),
    (("sys_ptrace",), "True []"),
    (("dac_read_search", "sys_ptrace"), "False [0, 3]"),
])
def test_another_users_vcpu_fds_need_dac_read_search_and_sys_ptrace(
        script, other_users_vmm, caps, seen):
    pid = other_users_vmm
    result = subprocess.run(
        as_nobody(caps) + [SYSTEM_PYTHON, "-c", FDS_HIDDEN % (
            os.path.dirname(script), pid, pid)],
        capture_output=True, text=True, timeout=30, cwd="/")
    assert (result.stdout, result.stderr) == (seen + "\n", "")


def test_a_vcpu_hidden_by_proc_permissions_says_why(bcc, script,
                                                    other_users_vmm):
    pid = other_users_vmm
    assert_one_error_line(
        run(NEEDED, ["-p", pid, "-v", 3, 1], script),
        "kvmexit: PID %d has no vCPU 3: cannot read its /proc/%d/fd "
        "(another user's process: needs CAP_SYS_PTRACE and "
        "CAP_DAC_READ_SEARCH)" % (pid, pid))


def test_with_sys_ptrace_another_users_vcpu_is_found(bcc, script,
                                                     other_users_vmm):
    pid = other_users_vmm
    result = run(NEEDED + ("sys_ptrace",), ["-p", pid, "-v", 3, 1], script)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == first_line("PID %d VCPU 3" % pid, 1) + "\n" + \
        HEADER_COLLAPSED + "\n"
