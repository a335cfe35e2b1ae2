"""The systemd unit, deploy/kvmexit.service, run by a real systemd.

This host's PID 1 is not systemd, so the test boots one: a container of
systemd-nspawn (systemd-container) over the host's own /usr, with
--volatile=yes (a tmpfs root and /etc, /usr read-only: nothing of the
host changes) and the host's network, so that /metrics is scraped from
here.  Inside it kvmexit is installed as a user would: pip into a venv at
/opt/kvmexit from a copy of the checkout (offline, with Debian's wheels),
the command linked into /usr/local/bin and the unit pip installed copied
to /etc/systemd/system; the port goes in /etc/default/kvmexit.  The
container is driven through nsenter into its PID 1's namespaces (without
systemd on the host there is no machined for machinectl or systemctl -M).

nspawn runs in a mount namespace of its own with a tmpfs on /run, where it
keeps its state (/run here is on disk), and in cgroups the test makes and
removes, so a run leaves no mount, file or cgroup behind; the container is
halted, or killed, whatever happens.

The unit runs kvmexit as a dynamic user with four capabilities, read back
from /proc/PID/status, and is Type=notify: `systemctl start` returns once
/metrics answers (kvmexit's sd_notify READY=1).  Its least privilege is
checked to be enough and to matter: under ProtectProc=invisible it finds
vCPU 0 of another user's VMM (a root process holding a real VM's vCPU fd)
and loses it without CAP_SYS_PTRACE; without CAP_BPF and CAP_PERFMON it
cannot load its program (runtime drop-ins, so that the unit file stays the
repo's).

Runs as root on the real kernel, never skipped (see conftest.py)."""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import bcc
import pytest

import kvmexit
from helpers import ROOT

UNIT = os.path.join(ROOT, "deploy", "kvmexit.service")
VENV = "/opt/kvmexit"
SOURCE = "/srv/kvmexit"         # the checkout's copy, in the container
# The syscalls and capabilities bcc needs, which nspawn's own seccomp
# filter and capability set leave out by default.
SYSCALLS = "bpf perf_event_open"
CAPABILITIES = "CAP_BPF,CAP_PERFMON"
BOOT_TIMEOUT = 60
# A start job waits for READY=1 (bcc compiles first: seconds here) or
# fails at the unit's TimeoutStartSec=120; this is longer, so that
# systemd's verdict is what a test sees.
START_TIMEOUT = 150
DESCRIPTION = "KVM exit counts for Prometheus (kvmexit)"
DROP_IN = "/run/systemd/system/kvmexit.service.d"
LOST_WHY = ("thread_table_full", "rare_table_full", "reason_unreadable",
            "latency_table_full", "write_back_failed")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leader_of(nspawn):
    """The container's PID 1 as seen here: nspawn's only child."""
    try:
        with open("/proc/%d/task/%d/children" % (nspawn.pid, nspawn.pid)) \
                as f:
            children = f.read().split()
    except FileNotFoundError:
        return None
    return int(children[0]) if len(children) == 1 else None


def cgroup_hierarchies():
    """Where systemd's cgroups live here: the cgroup2 one and, on a hybrid
    host like this one, the v1 name=systemd one."""
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _, where, kind, options = line.split()[:4]
            if kind == "cgroup2" or (
                    kind == "cgroup" and "name=systemd" in options.split(",")):
                found.append(where)
    return found


def remove_cgroups(top):
    """rmdir the cgroup `top` and those nspawn made in it, deepest first
    (a cgroup's files go with it); one a process is still in fails."""
    for where, _, _ in os.walk(top, topdown=False):
        os.rmdir(where)


class Machine:
    """A booted container and commands run inside it."""

    def __init__(self, nspawn, console, cgroups):
        self.nspawn, self.console, self.cgroups = nspawn, console, cgroups
        self.leader = None

    def run(self, argv, timeout=30, input=None):
        # A clean environment: pytest's (PYTHONPATH to the checkout, say)
        # must not reach the container.
        return subprocess.run(
            ["nsenter", "--target", str(self.leader), "--all", "--",
             "env", "-i", "PATH=/usr/local/bin:/usr/bin:/usr/sbin",
             "LANG=C.UTF-8"] + argv,
            capture_output=True, text=True, timeout=timeout, input=input)

    def check(self, argv, timeout=30, input=None):
        proc = self.run(argv, timeout, input)
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
        return proc.stdout

    def show(self, unit, *properties):
        out = self.check(["systemctl", "show", unit,
                          "-p", ",".join(properties)])
        return dict(line.split("=", 1) for line in out.splitlines())

    def journal(self, unit):
        # journald reads its sockets and streams when it gets to them:
        # --sync returns once all that was logged before it is stored.
        self.check(["journalctl", "--sync"])
        return self.check(["journalctl", "-u", unit, "--no-pager",
                           "-o", "cat"])

    def halt(self):
        """nspawn's SIGTERM halts the container cleanly; if that hangs,
        its PID 1 is killed, which ends every process inside it."""
        if self.nspawn and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                if self.leader:
                    os.kill(self.leader, signal.SIGKILL)
                self.nspawn.kill()
                self.nspawn.wait(timeout=30)
        self.console.close()
        for cgroup in self.cgroups:
            if os.path.isdir(cgroup):
                remove_cgroups(cgroup)


def boot(tmp_path):
    nspawn_path = shutil.which("systemd-nspawn")
    assert nspawn_path, "no systemd-nspawn: install systemd-container " \
        "(.ci/install --tests does)"
    name = "kvmexit-test-%d" % os.getpid()
    # A machine id of its own: the container's first boot would apply
    # the presets (enable every unit installed here, Prometheus's
    # included) to its empty /etc.
    machine_id = tmp_path / "machine-id"
    machine_id.write_text(os.urandom(16).hex() + "\n")
    nspawn = [nspawn_path, "--quiet", "--directory=/", "--volatile=yes",
              "--boot", "--machine=" + name,
              # No machined or systemd here to register with or to put
              # the container in a scope of its own.
              "--register=no", "--keep-unit", "--console=pipe",
              "--capability=" + CAPABILITIES,
              "--system-call-filter=" + SYSCALLS,
              "--bind-ro=%s:/etc/machine-id" % machine_id,
              # The host's /etc that /usr relies on: numpy's libblas.so.3
              # is a link through /etc/alternatives.
              "--bind-ro=/etc/alternatives", "--bind-ro=/etc/ld.so.cache",
              # bcc finds the tracepoint through debugfs or tracefs.
              "--bind=/sys/kernel/tracing", "--bind=/sys/kernel/debug",
              # For a VMM of the test's (a real VM and vCPU).
              "--bind=/dev/kvm",
              "--bind=%s:%s" % (tmp_path / "src", SOURCE),
              # /usr is read-only; this is where the command goes.
              "--tmpfs=/usr/local/bin"]
    # nspawn makes its cgroups (payload, supervisor) in its own: one of
    # the test's, removed after, not the host's root cgroup.
    cgroups = [os.path.join(h, name) for h in cgroup_hierarchies()]
    assert cgroups, "no cgroup2 or name=systemd hierarchy mounted"
    for cgroup in cgroups:
        os.mkdir(cgroup)
    console = open(tmp_path / "console", "w")
    machine = Machine(None, console, cgroups)
    try:
        machine.nspawn = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'for g in $CGROUPS; do echo $$ >"$g/cgroup.procs" || exit; '
             'done; mount -t tmpfs tmpfs /run && exec "$@"', "sh"] + nspawn,
            stdin=subprocess.DEVNULL, stdout=console,
            stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, CGROUPS=" ".join(cgroups)))
    except BaseException:
        machine.halt()
        raise
    return machine


def wait_booted(machine):
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        assert machine.nspawn.poll() is None, "nspawn ended: %s" % \
            open(machine.console.name).read()
        machine.leader = machine.leader or leader_of(machine.nspawn)
        if machine.leader:
            proc = machine.run(["systemctl", "is-system-running", "--wait"],
                               timeout=BOOT_TIMEOUT)
            # "degraded" too: a unit of the host that cannot start in a
            # container does not concern kvmexit.
            if proc.stdout.strip() in ("running", "degraded"):
                return
        time.sleep(0.2)
    raise AssertionError("the container did not boot in %d s: %s" % (
        BOOT_TIMEOUT, open(machine.console.name).read()))


@pytest.fixture
def machine(tmp_path):
    # pip builds in the tree it is given: a copy, as in test_install.py.
    shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "build", "*.egg-info"))
    m = boot(tmp_path)
    try:
        wait_booted(m)
        yield m
    finally:
        m.halt()


def install(machine, port):
    """pip into a venv that sees Debian's bcc, numpy and prometheus_client;
    then what the README's "Monitoring a fleet" says to do."""
    machine.check(["/usr/bin/python3", "-m", "venv",
                   "--system-site-packages", VENV])
    machine.check([VENV + "/bin/pip", "install", "--no-cache-dir",
                   "--no-index", "--find-links", "/usr/share/python-wheels",
                   SOURCE], timeout=120)
    machine.check(["ln", "-s", VENV + "/bin/kvmexit",
                   "/usr/local/bin/kvmexit"])
    machine.check(["install", "-D", "-m", "644",
                   VENV + "/lib/systemd/system/kvmexit.service",
                   "/etc/systemd/system/kvmexit.service"])
    machine.check(["sh", "-c", "mkdir -p /etc/default && "
                   "cat >/etc/default/kvmexit"],
                  input='KVMEXIT_OPTS="--prometheus 127.0.0.1:%d"\n' % port)
    machine.check(["systemctl", "daemon-reload"])


def scrape(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port,
                                timeout=10) as r:
        return r.status, r.read().decode()


# The unit's capabilities, as the kernel numbers them (linux/capability.h).
UNIT_CAPABILITIES = {"CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19,
                     "CAP_PERFMON": 38, "CAP_BPF": 39}
# systemd's range for DynamicUser= (docs: UIDS-GIDS.md).
DYNAMIC_UIDS = range(61184, 65520)


def unit_directive(name):
    with open(UNIT) as f:
        return [line.split("=", 1)[1] for line in f.read().splitlines()
                if line.startswith(name + "=")]


def process_status(machine, pid):
    """/proc/PID/status of a process in the container, as {field: value}."""
    text = machine.check(["cat", "/proc/%s/status" % pid])
    return dict((k, v.strip()) for k, v in (
        line.split(":", 1) for line in text.splitlines()))


def start(machine, port, options=""):
    """Options in /etc/default/kvmexit, then `systemctl start`: with
    Type=notify it returns once kvmexit says READY=1, or fails."""
    machine.check(["sh", "-c", "cat >/etc/default/kvmexit"],
                  input='KVMEXIT_OPTS="--prometheus 127.0.0.1:%d%s"\n'
                  % (port, options))
    return machine.run(["systemctl", "start", "kvmexit"],
                       timeout=START_TIMEOUT)


def drop_in(machine, text):
    machine.check(["sh", "-c", "mkdir -p %s && cat >%s/test.conf" % (
        DROP_IN, DROP_IN)], input="[Service]\n" + text + "\n")
    machine.check(["systemctl", "daemon-reload"])


def journal_through(machine, line, before=()):
    """kvmexit's journal once `line` is in it after the lines `before`:
    a line systemd logs just as a job ends can still be on its way to
    journald when systemctl returns, and must not turn up in the lines of
    the next step instead."""
    deadline = time.monotonic() + 30
    while True:
        lines = machine.journal("kvmexit").splitlines()
        if line in lines[len(before):]:
            return lines
        assert time.monotonic() < deadline, (line, lines[len(before):])
        time.sleep(0.2)


def stop(machine, before=()):
    """Stop kvmexit: its journal, through the line that says it stopped."""
    machine.check(["systemctl", "stop", "kvmexit"], timeout=60)
    return journal_through(machine, "Stopped kvmexit.service - %s."
                           % DESCRIPTION, before)


# A VMM as small as it gets: a VM with vCPU 0, held open (KVM_CREATE_VM,
# KVM_CREATE_VCPU from linux/kvm.h); ready once it says so.
VMM = """\
import fcntl, os, time
kvm = os.open("/dev/kvm", os.O_RDWR)
vm = fcntl.ioctl(kvm, 0xAE01, 0)
vcpu = fcntl.ioctl(vm, 0xAE41, 0)
print("vcpu", vcpu, flush=True)
time.sleep(3600)
"""


def start_vmm(machine):
    """The VMM as a transient root service in the container: its PID."""
    machine.check(["systemd-run", "--unit=vmm", "--service-type=exec",
                   "/usr/bin/python3", "-c", VMM])
    deadline = time.monotonic() + 30
    while "vcpu" not in machine.journal("vmm"):
        assert machine.show("vmm", "ActiveState")["ActiveState"] == \
            "active", machine.journal("vmm")
        assert time.monotonic() < deadline, machine.journal("vmm")
        time.sleep(0.2)
    return machine.show("vmm", "MainPID")["MainPID"]


def test_the_unit_runs_serves_metrics_and_stops_cleanly(machine):
    port = free_port()
    install(machine, port)
    # The unit systemd loads is the repo's, byte for byte.
    with open(UNIT) as f:
        assert machine.check(["cat", "/etc/systemd/system/kvmexit.service"]) \
            == f.read()
    assert machine.show("kvmexit", "FragmentPath", "LoadState", "Type") == {
        "FragmentPath": "/etc/systemd/system/kvmexit.service",
        "LoadState": "loaded", "Type": "notify"}

    # Enabled, as a user would: multi-user.target then holds the unit, so
    # that systemd keeps its exit status once it stops (a stopped unit
    # nothing refers to is unloaded and shows a fresh one's zeros).
    # Type=notify: the start job ends only when kvmexit is ready, so
    # /metrics answers at once, without waiting for it.
    proc = machine.run(["systemctl", "enable", "--now", "kvmexit"],
                       timeout=START_TIMEOUT)
    assert proc.returncode == 0, machine.journal("kvmexit")
    assert machine.show("kvmexit", "ActiveState", "SubState") == {
        "ActiveState": "active", "SubState": "running"}
    status, text = scrape(port)
    assert status == 200
    lines = text.splitlines()
    # No VM runs here: no series of kvm_exits_total, but its family.
    assert "# TYPE kvm_exits_total counter" in lines
    assert not [line for line in lines if line.startswith("kvm_exits_total")]
    assert "# TYPE kvmexit_lost_exits_total counter" in lines
    assert sorted(line for line in lines if line.startswith(
        "kvmexit_lost_exits_total")) == sorted(
            'kvmexit_lost_exits_total{why="%s"} 0.0' % why
            for why in LOST_WHY)
    build = [line for line in lines if line.startswith("kvmexit_build_info")]
    assert len(build) == 1, build
    assert build[0].startswith("kvmexit_build_info{")
    assert build[0].endswith("} 1.0")
    assert 'version="%s"' % kvmexit.VERSION in build[0]
    assert 'bcc="%s"' % bcc.__version__ in build[0]
    assert 'probe="tracepoint"' in build[0]
    # Still running after the scrape, as the same process.
    main_pid = machine.show("kvmexit", "MainPID")["MainPID"]
    assert main_pid != "0"
    assert machine.show("kvmexit", "ActiveState", "SubState", "MainPID") == {
        "ActiveState": "active", "SubState": "running", "MainPID": main_pid}

    # Not root, and the unit's capabilities only: the same four in every
    # set (ambient ones are inherited, permitted and effective), and no
    # way to gain more.
    assert sorted(unit_directive("CapabilityBoundingSet")[0].split()) == \
        sorted(unit_directive("AmbientCapabilities")[0].split()) == \
        sorted(UNIT_CAPABILITIES)
    mask = "%016x" % sum(1 << bit for bit in UNIT_CAPABILITIES.values())
    proc = process_status(machine, main_pid)
    uids, gids = proc["Uid"].split(), proc["Gid"].split()
    assert len(set(uids)) == 1 and int(uids[0]) in DYNAMIC_UIDS, uids
    assert len(set(gids)) == 1 and int(gids[0]) in DYNAMIC_UIDS, gids
    assert {key: proc[key] for key in ("CapInh", "CapPrm", "CapEff",
                                       "CapBnd", "CapAmb", "NoNewPrivs")} \
        == {"CapInh": mask, "CapPrm": mask, "CapEff": mask, "CapBnd": mask,
            "CapAmb": mask, "NoNewPrivs": "1"}

    journal = stop(machine)
    # Exited 0 on SIGTERM (CLD_EXITED is 1): killed by it would also be
    # Result=success, with ExecMainCode=2 and ExecMainStatus=15.
    # ExecMainPID: the status is that process's, not an unloaded unit's.
    assert machine.show("kvmexit", "ActiveState", "Result", "ExecMainPID",
                        "ExecMainCode", "ExecMainStatus") == {
        "ActiveState": "inactive", "Result": "success",
        "ExecMainPID": main_pid, "ExecMainCode": "1", "ExecMainStatus": "0"}
    assert "Traceback" not in "\n".join(journal)
    # "Started" once kvmexit is ready, after the line it prints then.
    assert journal == [
        "Starting kvmexit.service - %s..." % DESCRIPTION,
        "Display kvm exit reasons and statistics for all threads... Hit "
        "Ctrl-C to end.",
        "Started kvmexit.service - %s." % DESCRIPTION,
        "Stopping kvmexit.service - %s..." % DESCRIPTION,
        "kvmexit.service: Deactivated successfully.",
        "Stopped kvmexit.service - %s." % DESCRIPTION]
    with pytest.raises(urllib.error.URLError):
        scrape(port)

    # Another user's VMM: a root process holding vCPU 0 of a real VM (the
    # service's user is not root).  Under ProtectProc=invisible (its
    # hidepid lets CAP_SYS_PTRACE through) kvmexit sees it, lists its fds
    # and resolves them: -p PID -v 0 finds vCPU 0 through
    # /proc/PID/fd/N -> anon_inode:kvm-vcpu:0.
    vmm = start_vmm(machine)
    options = " -p %s -v 0" % vmm
    proc = start(machine, port, options)
    assert proc.returncode == 0, machine.journal("kvmexit")
    before, journal = journal, stop(machine, journal)
    assert journal[len(before):][:3] == [
        "Starting kvmexit.service - %s..." % DESCRIPTION,
        "Display kvm exit reasons and statistics for PID %s VCPU 0... Hit "
        "Ctrl-C to end." % vmm,
        "Started kvmexit.service - %s." % DESCRIPTION]

    # Each capability matters.  Without CAP_SYS_PTRACE the VMM is hidden,
    # and where /proc hides nothing its vCPU fds do not resolve; without
    # CAP_DAC_READ_SEARCH tracefs (root's, 0700) cannot be read; without
    # CAP_BPF and CAP_PERFMON the program cannot load.  Each time one
    # kvmexit: line, status 1, and the start job fails.
    for settings, options, why in (
            ("CapabilityBoundingSet=~CAP_SYS_PTRACE", options,
             "kvmexit: no such process: PID %s" % vmm),
            ("CapabilityBoundingSet=~CAP_SYS_PTRACE\nProtectProc=default",
             options, "kvmexit: PID %s has no vCPU 0: cannot read its "
             "/proc/%s/fd (another user's process: needs CAP_SYS_PTRACE and "
             "CAP_DAC_READ_SEARCH)" % (vmm, vmm)),
            ("CapabilityBoundingSet=~CAP_DAC_READ_SEARCH", "",
             "kvmexit: cannot search /sys/kernel/tracing for the kvm_exit "
             "tracepoint: missing CAP_DAC_READ_SEARCH"),
            ("CapabilityBoundingSet=~CAP_BPF CAP_PERFMON", "",
             "kvmexit: missing CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN): "
             "needed to load and attach the BPF program")):
        drop_in(machine, settings)
        proc = start(machine, port, options)
        assert proc.returncode != 0, settings
        assert machine.show("kvmexit", "Result", "ExecMainCode",
                            "ExecMainStatus") == {
            "Result": "exit-code", "ExecMainCode": "1",
            "ExecMainStatus": "1"}, settings
        # Then Restart=on-failure, 5 s later: stopped below.
        failed = "Failed to start kvmexit.service - %s." % DESCRIPTION
        before, journal = journal, journal_through(machine, failed, journal)
        assert journal[len(before):][:5] == [
            "Starting kvmexit.service - %s..." % DESCRIPTION,
            why,
            "kvmexit.service: Main process exited, code=exited, "
            "status=1/FAILURE",
            "kvmexit.service: Failed with result 'exit-code'.",
            failed], settings
        journal = stop(machine, journal)
        machine.check(["systemctl", "reset-failed", "kvmexit"])
