"""VM names: taken when a VM's threads are first seen, by the kernel as a
VM's thread first enters the thread table (-DVM_NAMES: its comm and the
first bytes of its command line, from its own memory), or by kvmexit from
/proc while the VM runs, so that a VM that lived one exit is never `?`.

The kernel tests run kvmexit's program (raw-old, SVM layout, with the
names feature) through BPF_PROG_TEST_RUN from real child processes named
like a VM (prctl PR_SET_NAME) and started with a VMM's command line
(tests/helpers/vmm.py); their ends are real thread ends, so the real
sched:sched_process_exit fires.  The VMMs themselves are not installed
here: the /proc of each (for kvmexit's own reads) is also a fake tree."""

import ctypes
import io
import json
import os
import subprocess

import pytest

from helpers import ROOT, bpfrun, kernel_btf
from helpers.vmm import HERE, SYSTEM_PYTHON, Vmm
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
    offsets = kvmexit.task_offsets()
    assert list(offsets) == [m for m, _, _ in kvmexit.TASK_OFFSETS]
    vmlinux = kvmexit.load_btf("vmlinux")
    assert offsets["TASK_COMM_OFF"] == vmlinux.offset("task_struct", "comm")
    assert offsets["MM_ARG_END_OFF"] == \
        vmlinux.offset("mm_struct", "arg_start") + 8
    flags = program({"names"}).cflags()
    assert "-DVM_NAMES" in flags
    for item in offsets.items():
        assert "-D%s=%d" % item in flags
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
    ledger.see(100)
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


#
# Names from the VM's own command line, taken by the kernel
#
def reports(ledger, snap):
    """(the text report with --comm, the JSON report's rows, the vm label)
    of a snapshot, with the ledger's names, as kvmexit prints them."""
    selection = kvmexit.Selection("all threads", "all")
    text, records = io.StringIO(), io.StringIO()
    report = kvmexit.TextReport(selection, kvmexit.ReasonNames(),
                                kvmexit.ReportOptions(comm=True), out=text)
    report.idents = ledger.idents
    report.report(snap, 0, 1)
    record = kvmexit.RecordReport(
        selection, kvmexit.ReasonNames(), kvmexit.Probe("raw-old", "test"),
        kvmexit.ReportOptions(json=True), out=records)
    record.idents = ledger.idents
    record.report(snap, 0, 1)
    return text.getvalue(), json.loads(records.getvalue())["rows"], \
        kvmexit.VmNames(idents=ledger.idents)


def test_a_vm_that_ended_before_the_first_tick_has_its_command_lines_name(
        loaded):
    b, tables = loaded()
    vm = Vmm.start(b.fd, "qemu-system-x86", [
        "-name", "guest=short-vm,debug-threads=on", "-m", "16"])
    start = kvmexit.process_start(vm.pid)
    vm.exits(0, IOIO, 3)
    vm.end()
    assert not os.path.exists("/proc/%d" % vm.pid)
    ledger = kvmexit.Ledger()
    snap = ledger.read(tables)
    assert snap.counts == {(vm.pid, vm.pid, SVM, IOIO): 3}
    assert ledger.idents[vm.pid] == kvmexit.Ident("qemu-system-x86",
                                                  "short-vm")
    # The kernel's start time is /proc's: the same process.
    assert ledger.starts[vm.pid] == start
    assert tables.keys(kvmexit.VM_COMM_MAP) == []
    text, rows, labels = reports(ledger, snap)
    assert text.splitlines()[1] == "%-8u %-32s %-8u %-35s %-8u" % (
        vm.pid, "qemu-system-x86 guest=short-vm", vm.pid, "IOIO", 3)
    assert [(r["pid"], r["comm"], r["count"]) for r in rows] == [
        (vm.pid, "qemu-system-x86 guest=short-vm", 3)]
    assert labels.get(vm.pid) == "short-vm"


@pytest.mark.parametrize("vmm", sorted(VMMS))
def test_each_vmms_name_from_its_own_memory(loaded, vmm):
    comm, argv, _, text, label = VMMS[vmm]
    b, tables = loaded()
    vm = Vmm.start(b.fd, comm, argv)
    vm.exits(1, IOIO)
    vm.end()
    ledger = kvmexit.Ledger()
    ledger.read(tables)
    assert ledger.idents[vm.pid].text() == text
    assert ledger.idents[vm.pid].label() == label


def test_start_times_as_a_process_in_another_time_namespace_reads_them():
    """/proc adds the reader's time namespace's boottime offset to start
    times; kvmexit in such a namespace adds it to the kernel's too."""
    pid, hz = os.getpid(), os.sysconf("SC_CLK_TCK")
    ns = kvmexit.process_start(pid) * (10 ** 9 // hz)
    script = ("import sys; sys.path.insert(0, %r); import kvmexit; "
              "print(kvmexit.process_start(%d), kvmexit.clock_ticks_of(%d))"
              % (ROOT, pid, ns))
    out = subprocess.run(["unshare", "--time", "--fork", "--boottime",
                          "1000", SYSTEM_PYTHON, "-c", script], cwd="/",
                         stdout=subprocess.PIPE, text=True, check=True)
    inside, ours = map(int, out.stdout.split())
    assert inside == kvmexit.process_start(pid) + 1000 * hz == ours


def cut_at(args_before, value):
    """Padding for "-append PAD" so that `value`, the last argument after
    args_before, ends this many bytes before the kernel's read stops
    (negative: past it)."""
    head = [SYSTEM_PYTHON, HERE, "-append"]
    tail = args_before
    fixed = sum(len(a) + 1 for a in head + tail) + 1    # PAD's NUL
    limit = kvmexit.VM_CMDLINE_BYTES - 1
    return lambda ends_before: "x" * (limit - ends_before - fixed -
                                      len(value) - 1)


@pytest.mark.parametrize("ends_before, guest", [
    (0, "late-vm"),         # its NUL is the last byte read
    (-1, None),             # its NUL is not read: the name may be cut
    (-4, None),             # "guest=late" is read: left out
])
def test_a_command_line_is_read_up_to_its_first_bytes(loaded, ends_before,
                                                      guest):
    b, tables = loaded()
    pad = cut_at(["-name"], "guest=late-vm")(ends_before)
    vm = Vmm.start(b.fd, "qemu-system-x86",
                   ["-append", pad, "-name", "guest=late-vm"])
    cmdline = vm.cmdline()
    end = cmdline.index(b"guest=late-vm\0") + len(b"guest=late-vm\0")
    assert end == kvmexit.VM_CMDLINE_BYTES - 1 - ends_before
    vm.exits(0, IOIO)
    vm.end()
    ledger = kvmexit.Ledger()
    ledger.read(tables)
    assert ledger.idents[vm.pid] == kvmexit.Ident("qemu-system-x86", guest)


def exit_keeps_memory():
    """Whether sched_process_exit fires before the ending thread lets go
    of its process's memory: where it has a group_dead argument, which
    came with that move (before, exit_mm() ran first)."""
    vmlinux = kvmexit.load_btf("vmlinux")
    return vmlinux.tracepoint_params("sched_process_exit") == 2


def test_debian_61_has_the_offsets_and_ends_threads_without_memory(
        tmp_path):
    """The lab's kernel: VM names compile there, and its thread ends come
    after exit_mm() (so they name a VM by its comm only)."""
    btf_dir = kernel_btf.write_btf_dir(kernel_btf.debian_release(),
                                       str(tmp_path))
    vmlinux = kvmexit.load_btf("vmlinux", btf_dir=btf_dir)
    assert kvmexit.task_offsets(btf_dir) == {
        macro: vmlinux.offset(struct_name, member)
        for macro, struct_name, member in kvmexit.TASK_OFFSETS}
    assert vmlinux.tracepoint_params("sched_process_exit") == 1


def test_as_its_thread_ends_the_kernel_names_a_vm_again(loaded):
    """A thread's end names its process again once its first name was
    read: the comm, and the command line where the kernel still has the
    VM's memory then."""
    b, tables = loaded()
    vm = Vmm.start(b.fd, "firecracker", ["--id", "vm-9"])
    start = kvmexit.process_start(vm.pid)
    vm.exits(0, IOIO)
    assert tables.take_names(kvmexit.VM_COMM_MAP) == {
        vm.pid: kvmexit.KernelName(start, kvmexit.Ident("firecracker",
                                                        "vm-9"))}
    vm.end()
    assert tables.take_names(kvmexit.VM_COMM_MAP) == {
        vm.pid: kvmexit.KernelName(start, kvmexit.Ident(
            "firecracker", "vm-9" if exit_keeps_memory() else None))}
