"""--detail's in-kernel half (bpf/detail.h), run in the kernel.

The program is the --detail one: the regular kvm_exit tracepoint and KVM's
other tracepoints, which bcc attaches as it loads them (this host never
fires them).  Regular tracepoint programs cannot be test-run, so it is
built with -DTEST_ENTRIES, which adds raw tracepoint entries taking the
tracepoints' fields as ctx->args and running the same code:
  test_kvm_exit(exit_reason, isa, info1, info2, intr_info, vcpu_id)
  test_kvm_msr(write, ecx)            test_kvm_hypercall(nr)
  test_kvm_mmio(type, len, gpa)       test_kvm_fast_mmio(gpa)
  test_kvm_page_fault(address, error_code)
  test_kvm_userspace_exit(reason, errno)
BPF_PROG_TEST_RUN runs them from threads of this process pinned to a CPU
(tests/helpers/bpfrun.py), with exit information encoded as the CPUs encode it
(AMD APM vol. 2, Intel SDM vol. 3C); the sub-counts read back must be
exact and decoded as the CPU meant them."""

import io
import os
import threading

import pytest

from helpers import bpfrun
import kvmexit

VMX, SVM = kvmexit.ISA_VMX, kvmexit.ISA_SVM
PID = os.getpid()
KINDS = kvmexit.DETAIL_KINDS
Detail = kvmexit.Detail

# SVM exit codes and EXITINFO1 bits of IOIO.
SVM_IOIO, SVM_MSR, SVM_HLT, SVM_NPF, SVM_VMMCALL = 0x7b, 0x7c, 0x78, 0x400, \
    0x81
SVM_EXCP_UD = 0x46
SVM_IN, SVM_SZ8, SVM_SZ16, SVM_SZ32, SVM_REP, SVM_STR = 1, 0x10, 0x20, \
    0x40, 0x8, 0x4
# VMX exit reasons.
VMX_EXC_NMI, VMX_EXT_INTR, VMX_CR, VMX_IO, VMX_EPT = 0, 1, 28, 30, 48
VMX_VALID = 0x80000000
ENTRIES = ("test_kvm_exit", "test_kvm_msr", "test_kvm_hypercall",
           "test_kvm_mmio", "test_kvm_fast_mmio", "test_kvm_page_fault",
           "test_kvm_userspace_exit")
TRACEPOINT = kvmexit.Probe("tracepoint", "test", tp_vcpu_id=True)
ALL = kvmexit.Selection("all threads", "all")


class DetailProgram:
    def __init__(self, bcc, selection=ALL, max_detail=None, monkeypatch=None):
        if max_detail:
            monkeypatch.setattr(kvmexit, "MAX_DETAIL", max_detail)
        self.ncpus = kvmexit.possible_cpus()
        self.program = bpfrun.TestEntries(TRACEPOINT, selection, 64,
                                          kvmexit.SVM_LAYOUT, {"detail"})
        self.b = kvmexit.load_program(self.program)
        self.fd = {name[len("test_"):]: self.b.load_func(
            name.encode(), bcc.BPF.RAW_TRACEPOINT).fd for name in ENTRIES}

    def events(self, thread, *events):
        """Run (entry, args) events in order from `thread`, on CPU 0 or
        where a move_to(cpu) among them takes it."""
        failed = []

        def job():
            os.sched_setaffinity(0, {0})
            try:
                for entry, args in events:
                    if entry == "move_to":
                        os.sched_setaffinity(0, {args})
                        assert bpfrun._libc.sched_getcpu() == args
                        continue
                    bpfrun.test_run(self.fd[entry],
                                    [a & (1 << 64) - 1 for a in args])
            except Exception as e:      # raised here, not in the thread
                failed.append(e)
        thread.call(job)
        if failed:
            raise failed[0]

    def snap(self):
        return kvmexit.snapshot(self.b, self.program, self.ncpus)

    def close(self):
        self.b.cleanup()


def exit_(code, isa=SVM, info1=0, info2=0, intr_info=0, vcpu=0):
    return ("kvm_exit", (code, isa, info1, info2, intr_info, vcpu))


def move_to(cpu):
    """The thread goes on on another CPU (as the scheduler may move a vCPU
    thread between its kvm_exit and the events of that exit)."""
    return ("move_to", cpu)


def user(reason=2, err=0):
    return ("kvm_userspace_exit", (reason, err))


def repeat(n, *events):
    return list(events) * n


def mine(snap, tid, isa=SVM, code=None):
    """{Detail: count} of one thread (and one reason)."""
    return {kvmexit.decode_detail(i, c, kind, key, attr): n
            for (tgid, t, i, c, kind, key, attr), n in snap.detail.items()
            if (tgid, t, i) == (PID, tid, isa) and code in (None, c)}


@pytest.fixture(scope="module")
def prog(bcc, cpus_0_1):
    p = DetailProgram(bcc)
    yield p
    p.close()


def test_detail_attaches_to_kvm_tracepoints(prog):
    assert sorted(prog.b.tracepoint_fds) == sorted(
        b"kvm:" + name.encode() for name in (
            "kvm_exit", "kvm_msr", "kvm_hypercall", "kvm_mmio",
            "kvm_fast_mmio", "kvm_page_fault", "kvm_userspace_exit"))


def test_default_program_has_no_detail(bcc, cpus_0_1):
    b = kvmexit.load_program(kvmexit.Program(TRACEPOINT, ALL, 64,
                                             kvmexit.SVM_LAYOUT))
    try:
        assert list(b.tracepoint_fds) == [b"kvm:kvm_exit"]
        with pytest.raises(KeyError):
            b[b"detail_counts"]
    finally:
        b.cleanup()


def test_svm_ports_by_direction_and_size(prog, threads):
    t = threads()
    port = lambda p, bits: exit_(SVM_IOIO, info1=p << 16 | bits)
    prog.events(t, *repeat(7, port(0x70, SVM_SZ8)),
                *repeat(3, port(0x71, SVM_IN | SVM_SZ8)),
                *repeat(2, port(0xcfc, SVM_IN | SVM_SZ32)),
                port(0x1f0, SVM_IN | SVM_SZ16 | SVM_REP | SVM_STR))
    snap = prog.snap()
    assert snap.counts[(PID, t.tid, SVM, SVM_IOIO)] == 13
    assert mine(snap, t.tid) == {
        Detail("port", 0x70, "out", 1): 7, Detail("port", 0x71, "in", 1): 3,
        Detail("port", 0xcfc, "in", 4): 2,
        Detail("port", 0x1f0, "rep ins", 2): 1}


def test_vmx_ports_crs_and_vectors(prog, threads):
    t = threads()
    io = lambda p, size, into: exit_(VMX_IO, VMX,
                                     info1=p << 16 | into << 3 | size - 1)
    cr = lambda n, access: exit_(VMX_CR, VMX, info1=access << 4 | 3 << 8 | n)
    event = lambda code, vector, kind, valid=VMX_VALID: exit_(
        code, VMX, intr_info=valid | kind << 8 | vector)
    prog.events(t, *repeat(5, io(0x3f8, 1, 0)), *repeat(4, io(0x3fd, 1, 1)),
                io(0xcf8, 4, 0), *repeat(6, cr(4, 0)), *repeat(2, cr(3, 1)),
                cr(0, 2), cr(0, 3),
                *repeat(3, event(VMX_EXC_NMI, 14, 3)),
                event(VMX_EXC_NMI, 2, 2), event(VMX_EXC_NMI, 3, 6),
                *repeat(8, event(VMX_EXT_INTR, 0xec, 0)),
                # No valid vector: counted as an exit, with no sub-key.
                event(VMX_EXT_INTR, 0, 0, valid=0))
    snap = prog.snap()
    assert snap.counts[(PID, t.tid, VMX, VMX_EXT_INTR)] == 9
    assert mine(snap, t.tid, VMX) == {
        Detail("port", 0x3f8, "out", 1): 5, Detail("port", 0x3fd, "in", 1): 4,
        Detail("port", 0xcf8, "out", 4): 1,
        Detail("cr", 4, "write"): 6, Detail("cr", 3, "read"): 2,
        Detail("cr", 0, "clts"): 1, Detail("cr", 0, "lmsw"): 1,
        Detail("vector", 14, "exception", name="#PF"): 3,
        Detail("vector", 2, "nmi"): 1,
        Detail("vector", 3, "soft-exc", name="#BP"): 1,
        Detail("vector", 0xec, "external"): 8}


def test_svm_npf_pages_and_exception_vectors(prog, threads):
    t = threads()
    npf = lambda gpa, err: exit_(SVM_NPF, info1=err, info2=gpa)
    prog.events(t, *repeat(4, npf(0xfee00300, 0x0f)),     # P W U RSVD
                npf(0xfee00ff0, 0x0d),                       # P U RSVD
                *repeat(2, npf(0x7000, 0x14)),               # fetch, not P
                *repeat(3, exit_(SVM_EXCP_UD)))
    snap = prog.snap()
    assert mine(snap, t.tid) == {
        Detail("page", 0xfee00000, "write", name="rsvd"): 4,
        Detail("page", 0xfee00000, "read", name="rsvd"): 1,
        Detail("page", 0x7000, "fetch", name="not-present"): 2,
        Detail("vector", 6, "exception", name="#UD"): 3}


def test_msrs_hypercalls_and_mmio_count_under_the_exit_being_handled(
        prog, threads):
    t = threads()
    prog.events(t, *repeat(5, exit_(SVM_MSR, info1=1),
                           ("kvm_msr", (1, 0x6e0))),
                *repeat(3, exit_(SVM_MSR), ("kvm_msr", (0, 0x1b))),
                exit_(SVM_MSR, info1=1), ("kvm_msr", (1, 0x4b564d99)),
                *repeat(2, exit_(SVM_VMMCALL), ("kvm_hypercall", (5,))),
                # An MMIO write and a read that user space completes.
                exit_(SVM_NPF, info1=0xf, info2=0xd0000000),
                ("kvm_mmio", (2, 4, 0xd0000004)),
                exit_(SVM_NPF, info1=0xd, info2=0xd0000000),
                ("kvm_mmio", (0, 2, 0xd0000008)),
                ("kvm_mmio", (1, 2, 0xd0000008)),
                exit_(SVM_NPF, info1=0xf, info2=0xfeb00000),
                ("kvm_fast_mmio", (0xfeb00010,)))
    snap = prog.snap()
    assert mine(snap, t.tid, code=SVM_MSR) == {
        Detail("msr", 0x6e0, "write", name="IA32_TSC_DEADLINE"): 5,
        Detail("msr", 0x1b, "read", name="IA32_APIC_BASE"): 3,
        Detail("msr", 0x4b564d99, "write"): 1}
    assert mine(snap, t.tid, code=SVM_VMMCALL) == {
        Detail("hypercall", 5, name="KICK_CPU"): 2}
    npf = mine(snap, t.tid, code=SVM_NPF)
    assert {d: n for d, n in npf.items() if d.kind == "mmio"} == {
        Detail("mmio", 0xd0000004, "write", 4): 1,
        Detail("mmio", 0xd0000008, "unsat-read", 2): 1,
        Detail("mmio", 0xd0000008, "read", 2): 1,
        Detail("mmio", 0xfeb00010, "fast-write"): 1}


def test_user_space_exits_count_once_per_exit(prog, threads):
    t = threads()
    user = lambda reason, err=0: ("kvm_userspace_exit", (reason, err))
    prog.events(t, *repeat(4, exit_(SVM_IOIO, info1=0xf4 << 16), user(2)),
                # KVM_RUN again, a signal before entering: no exit of its
                # own, not the port write's.
                user(10, -4),
                exit_(SVM_HLT), user(10, -4))
    snap = prog.snap()
    assert mine(snap, t.tid, code=SVM_IOIO) == {
        Detail("port", 0xf4, "out", None): 4,
        Detail("user", 2, name="KVM_EXIT_IO"): 4}
    assert mine(snap, t.tid, code=SVM_HLT) == {
        Detail("user", 10, name="errno EINTR"): 1}


#
# Exact when a thread is preempted or moves between its exit and the
# events of that exit: the exit is kept in a slot of the CPU it happened on.
#
def test_events_after_a_move_count_under_the_exit_on_the_other_cpu(
        prog, threads, cpus_0_1):
    t = threads()
    prog.events(t, exit_(SVM_MSR, info1=1), move_to(1),
                ("kvm_msr", (1, 0x6e0)), user(), user(),
                move_to(0), user(), ("kvm_msr", (1, 0x6e0)),
                # A new exit on CPU 1, its events on CPU 0.
                move_to(1), exit_(SVM_IOIO, info1=0x70 << 16), move_to(0),
                user(), move_to(1), user())
    snap = prog.snap()
    assert mine(snap, t.tid, code=SVM_MSR) == {
        Detail("msr", 0x6e0, "write", name="IA32_TSC_DEADLINE"): 2,
        Detail("user", 2, name="KVM_EXIT_IO"): 1}
    assert mine(snap, t.tid, code=SVM_IOIO) == {
        Detail("port", 0x70, "out", None): 1,
        Detail("user", 2, name="KVM_EXIT_IO"): 1}


def test_a_slot_left_on_another_cpu_is_not_taken_for_the_last_exit(
        prog, threads, cpus_0_1):
    t = threads()
    # HLT on CPU 0, then MSR on CPU 1: CPU 0's slot must not answer for
    # the MSR exit when the thread comes back there before its next exit.
    prog.events(t, exit_(SVM_HLT), move_to(1), exit_(SVM_MSR), move_to(0),
                ("kvm_msr", (0, 0x1b)), user(10, -4),
                # And back: VMMCALL on CPU 0, its hypercall on CPU 1.
                exit_(SVM_VMMCALL), move_to(1), ("kvm_hypercall", (5,)),
                # Exits on both CPUs in turn, events after each move.
                *repeat(3, move_to(0), exit_(SVM_MSR, info1=1), move_to(1),
                        ("kvm_msr", (1, 0x830)), exit_(SVM_HLT), move_to(0),
                        user(10, -4)))
    snap = prog.snap()
    assert mine(snap, t.tid, code=SVM_MSR) == {
        Detail("msr", 0x1b, "read", name="IA32_APIC_BASE"): 1,
        Detail("user", 10, name="errno EINTR"): 1,
        Detail("msr", 0x830, "write", name="X2APIC_ICR"): 3}
    assert mine(snap, t.tid, code=SVM_VMMCALL) == {
        Detail("hypercall", 5, name="KICK_CPU"): 1}
    assert mine(snap, t.tid, code=SVM_HLT) == {
        Detail("user", 10, name="errno EINTR"): 3}


def test_a_thread_preempted_by_another_on_its_cpu_keeps_its_exit(
        prog, threads, cpus_0_1):
    t, u = threads(2)
    prog.events(t, exit_(SVM_MSR, info1=1))
    # u exits on CPU 0 while t is off it, and takes the CPU's slot.
    prog.events(u, exit_(SVM_HLT))
    prog.events(t, ("kvm_msr", (1, 0x6e0)), user(), user())
    prog.events(u, user(10, -4))
    # t takes the slot back; u, preempted, goes on on CPU 1.
    prog.events(t, exit_(SVM_IOIO, info1=0x71 << 16 | SVM_IN))
    prog.events(u, move_to(1), user(10, -4), ("kvm_msr", (0, 0x1b)))
    prog.events(t, user(), move_to(1), user())
    snap = prog.snap()
    assert mine(snap, t.tid, code=SVM_MSR) == {
        Detail("msr", 0x6e0, "write", name="IA32_TSC_DEADLINE"): 1,
        Detail("user", 2, name="KVM_EXIT_IO"): 1}
    assert mine(snap, t.tid, code=SVM_IOIO) == {
        Detail("port", 0x71, "in", None): 1,
        Detail("user", 2, name="KVM_EXIT_IO"): 1}
    assert mine(snap, u.tid) == {
        Detail("user", 10, name="errno EINTR"): 1,
        Detail("msr", 0x1b, "read", name="IA32_APIC_BASE"): 1}
    assert snap.counts[(PID, u.tid, SVM, SVM_HLT)] == 1


def test_preempted_then_moved_then_exiting_again(prog, threads, cpus_0_1):
    t, u = threads(2)
    # t's exit on CPU 0 goes away when u takes the slot; t returns to
    # user space on CPU 1, then exits there and on CPU 0 again.
    prog.events(t, exit_(SVM_VMMCALL))
    prog.events(u, exit_(SVM_HLT), ("kvm_msr", (0, 0x1b)))
    prog.events(t, move_to(1), ("kvm_hypercall", (1,)), user(),
                exit_(SVM_MSR), ("kvm_msr", (1, 0x6e0)), move_to(0),
                ("kvm_msr", (1, 0x6e0)), user(), user(),
                exit_(SVM_IOIO, info1=0x80 << 16), move_to(1), user())
    prog.events(u, user(10, -4), move_to(1), ("kvm_msr", (0, 0x1b)))
    snap = prog.snap()
    assert mine(snap, t.tid, code=SVM_VMMCALL) == {
        Detail("hypercall", 1, name="VAPIC_POLL_IRQ"): 1,
        Detail("user", 2, name="KVM_EXIT_IO"): 1}
    assert mine(snap, t.tid, code=SVM_MSR) == {
        Detail("msr", 0x6e0, "write", name="IA32_TSC_DEADLINE"): 2,
        Detail("user", 2, name="KVM_EXIT_IO"): 1}
    assert mine(snap, t.tid, code=SVM_IOIO) == {
        Detail("port", 0x80, "out", None): 1,
        Detail("user", 2, name="KVM_EXIT_IO"): 1}
    assert mine(snap, u.tid) == {
        Detail("msr", 0x1b, "read", name="IA32_APIC_BASE"): 2,
        Detail("user", 10, name="errno EINTR"): 1}


def test_events_of_threads_without_exits_are_not_counted(prog, threads):
    t = threads()
    prog.events(t, ("kvm_msr", (1, 0x830)), ("kvm_hypercall", (1,)),
                ("kvm_userspace_exit", (2, 0)), ("kvm_mmio", (2, 4, 0x1000)))
    assert mine(prog.snap(), t.tid) == {}


def test_page_faults_count_for_vmx_ept_violations_only(prog, threads):
    vmx, svm = threads(2)
    prog.events(vmx, *repeat(3, exit_(VMX_EPT, VMX, info1=0x182),
                             ("kvm_page_fault", (0xfebf1234, 0x182))),
                exit_(VMX_EPT, VMX), ("kvm_page_fault", (0x9000, 0x184)))
    # SVM's NPF has its address in kvm_exit's fields: not counted twice.
    prog.events(svm, exit_(SVM_NPF, info1=0x6, info2=0x5000),
                ("kvm_page_fault", (0x5000, 0x6)))
    assert mine(prog.snap(), vmx.tid, VMX) == {
        Detail("page", 0xfebf1000, "write"): 3,
        Detail("page", 0x9000, "fetch"): 1}
    assert mine(prog.snap(), svm.tid) == {
        Detail("page", 0x5000, "write", name="not-present"): 1}


def test_filtered_out_threads_leave_no_detail(bcc, cpus_0_1, threads):
    other = kvmexit.Selection("PID 1", "pid", tgid=1)
    p = DetailProgram(bcc, other)
    try:
        t = threads()
        p.events(t, exit_(SVM_IOIO, info1=0x70 << 16),
                 exit_(SVM_MSR), ("kvm_msr", (1, 0x6e0)))
        snap = p.snap()
        assert (snap.counts, snap.detail) == ({}, {})
    finally:
        p.close()


def test_a_full_detail_table_loses_sub_keys_not_exits(bcc, cpus_0_1,
                                                      threads, monkeypatch):
    p = DetailProgram(bcc, max_detail=4, monkeypatch=monkeypatch)
    try:
        t = threads()
        p.events(t, *[exit_(SVM_IOIO, info1=port << 16)
                      for port in range(0x80, 0x86) for _ in range(2)])
        snap = p.snap()
        assert snap.counts[(PID, t.tid, SVM, SVM_IOIO)] == 12
        assert sum(mine(snap, t.tid).values()) == 8
        assert len(snap.detail) == 4
        assert snap.detail_lost == 4
        assert snap.lost == [0] * len(kvmexit.LOST)
    finally:
        p.close()


# Pending counts: each CPU holds the last key of each of its entries and
# how many of it are not in detail_counts yet; ports 0x70 and 0x72 share an
# entry (same kind, same lowest bit), 0x70 and 0x71 do not.
def port(p):
    return exit_(SVM_IOIO, info1=p << 16)


OUT_70, OUT_72 = Detail("port", 0x70, "out", None), \
    Detail("port", 0x72, "out", None)


def test_a_new_key_in_an_entry_adds_the_pending_count_of_the_last(
        prog, threads):
    t = threads()
    prog.events(t, *repeat(3, port(0x70)), *repeat(2, port(0x72)),
                port(0x70), port(0x72), port(0x70))
    assert mine(prog.snap(), t.tid) == {OUT_70: 5, OUT_72: 3}


def test_another_thread_in_an_entry_adds_the_pending_count_of_the_last(
        prog, threads):
    a, b = threads(2)
    prog.events(a, *repeat(4, port(0x70)))
    prog.events(b, *repeat(2, port(0x70)))
    prog.events(a, port(0x70))
    snap = prog.snap()
    assert (mine(snap, a.tid), mine(snap, b.tid)) == \
        ({OUT_70: 5}, {OUT_70: 2})


def test_a_read_takes_the_pending_counts_once(prog, threads, cpus_0_1):
    t = threads()
    # Pending on both CPUs: the thread moved between exits to one port.
    prog.events(t, *repeat(3, port(0x70)), move_to(1), *repeat(2, port(0x70)))
    first = prog.snap()
    assert mine(first, t.tid) == {OUT_70: 5}
    assert mine(prog.snap(), t.tid) == {OUT_70: 5}
    prog.events(t, move_to(1), port(0x70), move_to(0), port(0x70))
    last = prog.snap()
    assert mine(last, t.tid) == {OUT_70: 7}
    assert mine(last.minus(first), t.tid) == {OUT_70: 2}


def pending_entries(prog):
    """The detail_pending table (struct detail_pending per CPU entry)."""
    return prog.b[b"detail_pending"]


def test_a_flush_that_interrupts_an_event_leaves_the_cpu_for_a_retry(
        prog, threads, monkeypatch):
    t = threads()
    prog.events(t, *repeat(2, port(0x70)))
    table = pending_entries(prog)
    index = next(i for i in range(kvmexit.PENDING_ENTRIES)
                 if table[i].key.pid_tgid == PID << 32 | t.tid)
    busy = table[index]
    busy.busy = 1
    table[index] = busy         # as an event on CPU 0 would leave it
    monkeypatch.setattr(kvmexit, "FLUSH_TRIES", 3)
    try:
        with pytest.raises(kvmexit.Error) as exc:
            prog.snap()
        assert str(exc.value) == \
            "cannot flush --detail's counts on CPU 0: busy"
        assert table[index].count == 2
    finally:
        busy.busy = 0
        table[index] = busy
    assert mine(prog.snap(), t.tid) == {OUT_70: 2}
    assert table[index].count == 0


def test_reads_while_a_thread_counts_on_another_cpu_are_exact(
        prog, threads, cpus_0_1):
    """Each read runs the flush on CPU 1 (an IPI) while the thread counts
    there: the counts read never go down, and the last is exact."""
    t = threads()
    events = [port(0x70 + n % 4) for n in range(4000)]
    done = []

    def job():
        prog.events(t, move_to(1), *events)
        done.append(True)
    firing = threading.Thread(target=job)
    firing.start()
    seen = []
    while not done:
        seen.append(sum(mine(prog.snap(), t.tid).values()))
    firing.join()
    assert seen == sorted(seen)
    assert mine(prog.snap(), t.tid) == {
        Detail("port", 0x70 + n, "out", None): 1000 for n in range(4)}


def test_text_report_shows_sub_keys_under_their_reason(prog, threads):
    t = threads()
    prog.events(t, *repeat(3, exit_(SVM_MSR, info1=1),
                           ("kvm_msr", (1, 0x830))),
                exit_(SVM_MSR, info1=1), ("kvm_msr", (1, 0x80b)),
                *repeat(2, exit_(SVM_IOIO, info1=0x510 << 16 | SVM_SZ8)))
    snap = prog.snap()
    # As the kernel's TID filter would have it.
    snap.counts = {k: n for k, n in snap.counts.items() if k[1] == t.tid}
    snap.detail = {k: n for k, n in snap.detail.items() if k[1] == t.tid}
    out = io.StringIO()
    tid_only = kvmexit.Selection("TID %d" % t.tid, "tid", tids=[t.tid])
    kvmexit.TextReport(tid_only, kvmexit.ReasonNames(),
                       kvmexit.ReportOptions(detail=True), out).report(
        snap, 0, 0)
    assert out.getvalue().splitlines() == [
        "KVM_EXIT_REASON                     COUNT",
        "MSR                                 4       ",
        "  msr 0x830 write X2APIC_ICR        3       ",
        "  msr 0x80b write X2APIC_EOI        1       ",
        "IOIO                                2       ",
        "  port 0x510 out 1B                 2       ",
    ]


#
# --detail --prometheus: kvm_exit_details_total
#
def scrape(program, bound=None, labels=kvmexit.SERIES_LABELS):
    """The details families of a scrape of this program's tables:
    {name: {labels as a dict's sorted items: value}}."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    tables = kvmexit.ThreadTables(program.b, program.program,
                                  program.ncpus)
    ledger = kvmexit.Ledger()
    exporter = kvmexit.Exporter(lambda: ledger.read(tables),
                                kvmexit.ReasonNames(), ALL,
                                kvmexit.VmNames(), False,
                                {"version": kvmexit.VERSION}, None, labels,
                                None, True)
    if bound:
        exporter.details.bound = bound
    registry = CollectorRegistry()
    registry.register(exporter)
    got = {}
    for family in text_string_to_metric_families(
            generate_latest(registry).decode()):
        for s in family.samples:
            if "detail" in s.name:
                got.setdefault(s.name, {})[tuple(sorted(
                    s.labels.items()))] = s.value
    return got


def detail_series(vcpu, reason, kind, key, op="", name="", vm=None):
    labels = {"vm": vm or kvmexit.vm_label(PID), "reason": reason,
              "kind": kind, "key": key, "op": op, "name": name}
    if vcpu is not None:
        labels["vcpu"] = vcpu
    return tuple(sorted(labels.items()))


def test_details_are_exported_with_keys_as_the_report_writes_them(
        bcc, cpus_0_1, threads):
    p = DetailProgram(bcc)
    try:
        t = threads()
        port = lambda n, bits: exit_(SVM_IOIO, info1=n << 16 | bits,
                                     vcpu=3)
        p.events(t, *repeat(7, port(0x70, SVM_SZ8)),
                 *repeat(3, port(0x71, SVM_IN | SVM_SZ8)),
                 *repeat(5, exit_(SVM_MSR, info1=1, vcpu=3),
                         ("kvm_msr", (1, 0x6e0))),
                 *repeat(2, exit_(SVM_VMMCALL, vcpu=3),
                         ("kvm_hypercall", (5,))))
        got = scrape(p)
        assert got["kvm_exit_details_total"] == {
            detail_series("3", "IOIO", "port", "0x70", "out"): 7,
            detail_series("3", "IOIO", "port", "0x71", "in"): 3,
            detail_series("3", "MSR", "msr", "0x6e0", "write",
                          "IA32_TSC_DEADLINE"): 5,
            detail_series("3", "VMMCALL", "hypercall", "5", "",
                          "KICK_CPU"): 2}
        assert got["kvmexit_detail_lost_total"] == {(): 0}
        assert "kvm_exit_details_dropped_total" not in got
        # Without vcpu in --labels, summed over the VM's vCPUs.
        t2 = threads()
        p.events(t2, *repeat(4, exit_(SVM_IOIO, info1=0x70 << 16 | SVM_SZ8,
                                      vcpu=1)))
        got = scrape(p, labels=("vm", "reason"))
        assert got["kvm_exit_details_total"][
            detail_series(None, "IOIO", "port", "0x70", "out")] == 11
    finally:
        p.close()


def test_details_beyond_the_bound_are_counted_as_dropped(
        bcc, cpus_0_1, threads):
    p = DetailProgram(bcc)
    try:
        t = threads()
        port = lambda n: exit_(SVM_IOIO, info1=n << 16 | SVM_SZ8, vcpu=0)
        p.events(t, *repeat(9, port(0x70)), *repeat(6, port(0x71)),
                 *repeat(2, port(0x72)), port(0x73))
        got = scrape(p, bound=2)
        assert got["kvm_exit_details_total"] == {
            detail_series("0", "IOIO", "port", "0x70", "out"): 9,
            detail_series("0", "IOIO", "port", "0x71", "out"): 6}
        assert got["kvm_exit_details_dropped_total"] == {
            (("reason", "IOIO"), ("vcpu", "0"),
             ("vm", kvmexit.vm_label(PID))): 3}
    finally:
        p.close()


def test_a_served_detail_stays_served_and_dropped_never_goes_down():
    series = kvmexit.DetailSeries(bound=2)
    g = ("vm", "IOIO")
    kept, dropped = series.series({(g, ("port", "0x1")): 5,
                                   (g, ("port", "0x2")): 4,
                                   (g, ("port", "0x3")): 1})
    assert (kept, dropped) == ({g + ("port", "0x1"): 5,
                                g + ("port", "0x2"): 4}, {g: 1})
    # 0x3 overtakes both: it stays dropped, and so does its count.
    kept, dropped = series.series({(g, ("port", "0x1")): 5,
                                   (g, ("port", "0x2")): 4,
                                   (g, ("port", "0x3")): 50})
    assert (kept, dropped) == ({g + ("port", "0x1"): 5,
                                g + ("port", "0x2"): 4}, {g: 50})
    # The VM is gone: its room is freed.
    assert series.series({}) == ({}, {})
    assert series.kept == {}
