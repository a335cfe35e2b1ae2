"""VM names: taken when a VM's threads are first seen, by kvmexit from
/proc while the VM runs, or by the kernel as a thread that exited to KVM
ends (-DVM_NAMES), so that a VM that lived one exit is never `?`.

The kernel tests run kvmexit's program (raw-old, SVM layout, with the
names feature) through BPF_PROG_TEST_RUN from a child process named like
a VM (prctl PR_SET_NAME); its end is a real thread end, so the real
sched:sched_process_exit fires.  Each VMM's command line is a fake /proc
tree: the VMMs themselves are not installed here."""

import ctypes
import os

import pytest

from helpers import bpfrun
import kvmexit

SVM = kvmexit.ISA_SVM
IOIO = 0x7b
PR_SET_NAME = 15


def program(features):
    return kvmexit.Program(kvmexit.Probe("raw-old", "test"),
                           kvmexit.Selection("all threads", "all"),
                           64, kvmexit.SVM_LAYOUT, frozenset(features))


@pytest.fixture
def loaded(bcc, cpus_0_1):
    made = []

    def make(features=("names",)):
        b = kvmexit.load_program(program(features))
        b.fd = b.load_func(b"raw_kvm_exit", bcc.BPF.RAW_TRACEPOINT).fd
        made.append(b)
        return b, kvmexit.ThreadTables(b, program(features),
                                       kvmexit.possible_cpus())

    yield make
    for b in made:
        b.cleanup()


def short_vm(fd, name, exits=1):
    """A child process named `name` that exits `exits` times to KVM on
    CPU 0 and ends at once; its pid, once reaped."""
    pid = os.fork()
    if pid == 0:
        try:
            ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode(), 0, 0, 0)
            os.sched_setaffinity(0, {0})
            for _ in range(exits):
                bpfrun.test_run(fd, [IOIO, 0, SVM])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_the_names_feature_is_in_the_program_where_btf_has_the_offsets():
    leader, comm = kvmexit.task_offsets()
    assert 0 < leader and 0 < comm
    flags = program({"names"}).cflags()
    assert "-DVM_NAMES" in flags
    assert "-DTASK_COMM_OFF=%d" % comm in flags
    assert kvmexit.VM_COMM_MAP in program({"names"}).maps()
    assert kvmexit.VM_COMM_MAP not in program(()).maps()


def test_a_vm_that_ended_before_the_first_tick_keeps_its_name(loaded):
    b, tables = loaded()
    child = short_vm(b.fd, "fc-short-vm", exits=3)
    assert not os.path.exists("/proc/%d" % child)
    ledger = kvmexit.Ledger()
    snap = ledger.read(tables)
    assert {k: v for k, v in snap.counts.items() if k[0] == child} == {
        (child, child, SVM, IOIO): 3}
    assert ledger.idents[child] == kvmexit.Ident("fc-short-vm", None)
    # Taken once: the kernel's entry is deleted.
    assert tables.keys(kvmexit.VM_COMM_MAP) == []
    # Every report names it.
    report = kvmexit.TextReport(kvmexit.Selection("all threads", "all"),
                                kvmexit.ReasonNames())
    report.idents = ledger.idents
    assert report.comm(child) == "fc-short-vm"
    names = kvmexit.VmNames(idents=ledger.idents)
    assert names.get(child) == "fc-short-vm"


def test_without_the_feature_such_a_vm_is_unnamed(loaded):
    # What the kernel's name is for: from /proc alone it is `?`.
    b, tables = loaded(features=())
    child = short_vm(b.fd, "unnamed-vm")
    ledger = kvmexit.Ledger()
    ledger.read(tables)
    assert child not in ledger.idents
    assert kvmexit.VmNames(idents=ledger.idents).get(child) == "?"


def test_threads_that_never_exited_to_kvm_leave_no_name(loaded):
    b, tables = loaded()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert pid not in {kvmexit.TGID_KEY.layout.unpack(k)[0]
                       for k in tables.keys(kvmexit.VM_COMM_MAP)}


def test_a_running_vm_is_named_from_proc_when_first_seen(loaded, threads):
    b, tables = loaded()
    live = threads()
    live.exits(b.fd, 0, IOIO, SVM)
    ledger = kvmexit.Ledger()
    ledger.retire(tables)
    assert ledger.idents[os.getpid()] == kvmexit.process_ident(os.getpid())


#
# Each VMM's names, from a fake /proc
#
# (comm, argv, its vCPU threads' names, what reports show, the vm label).
VMMS = {
    "qemu": ("qemu-system-x86", ["qemu-system-x86_64", "-name",
                                 "guest=web1,debug-threads=on", "-m", "1G"],
             "CPU %d/KVM", "qemu-system-x86 guest=web1", "web1"),
    "qemu -name NAME": ("qemu-system-x86", ["qemu-system-x86_64", "-name",
                                            "db2"],
                        "CPU %d/KVM", "qemu-system-x86 guest=db2", "db2"),
    "libvirt": ("qemu-kvm", ["/usr/libexec/qemu-kvm", "-name",
                             "guest=instance-0000002a,debug-threads=on",
                             "-S", "-object", "secret,id=masterKey0"],
                "CPU %d/KVM", "qemu-kvm guest=instance-0000002a",
                "instance-0000002a"),
    "firecracker": ("firecracker", ["/usr/bin/firecracker", "--id",
                                    "vm-7f3a", "--api-sock",
                                    "/run/fc.sock"],
                    "fc_vcpu %d", "firecracker guest=vm-7f3a", "vm-7f3a"),
    "cloud-hypervisor": ("cloud-hyperviso", [
        "cloud-hypervisor", "--kernel", "vmlinux", "--cpus", "boot=2",
        "--api-socket", "/run/ch.sock"],
        "vcpu%d", "cloud-hyperviso", "cloud-hyperviso"),
    "crosvm": ("crosvm", ["crosvm", "run", "--cpus", "2", "bzImage"],
               "crosvm_vcpu%d", "crosvm", "crosvm"),
}


def fake_vmm(fake_proc, pid, comm, argv, vcpu_name):
    """A VMM process with two vCPU threads, as /proc shows it."""
    fake_proc.process(pid, {pid: comm, pid + 1: vcpu_name % 0,
                            pid + 2: vcpu_name % 1})
    top = os.path.join(fake_proc.path, str(pid))
    with open(os.path.join(top, "comm"), "w") as f:
        f.write(comm + "\n")
    with open(os.path.join(top, "cmdline"), "w") as f:
        f.write("\0".join(argv) + "\0")


@pytest.mark.parametrize("vmm", sorted(VMMS))
def test_each_vmms_name_in_reports_and_labels(fake_proc, vmm):
    comm, argv, vcpu_name, text, label = VMMS[vmm]
    fake_vmm(fake_proc, 100, comm, argv, vcpu_name)
    proc = fake_proc.path
    assert kvmexit.process_ident(100, proc).text() == text
    assert kvmexit.process_name(100, proc) == text
    assert kvmexit.vm_label(100, proc) == label
    ledger = kvmexit.Ledger(proc=proc)
    ledger.note_ident(100)
    # Named once: the VM may end, the name stays.
    for name in ("comm", "cmdline"):
        os.remove(os.path.join(proc, "100", name))
    assert kvmexit.process_name(100, proc) == "?"
    assert kvmexit.VmNames(proc, ledger.idents).get(100) == label
    report = kvmexit.TextReport(kvmexit.Selection("all threads", "all"),
                                kvmexit.ReasonNames())
    report.idents = ledger.idents
    assert report.comm(100) == text
    # The vCPU threads' names are the VMM's own, not the VM's.
    assert kvmexit.thread_names(100, proc)[101] == vcpu_name % 0 + "\n"
