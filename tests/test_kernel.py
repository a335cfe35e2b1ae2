"""The real BPF program, compiled and loaded through bcc on this kernel.

Both probe modes load and attach here: the regular tracepoint, and the raw
tracepoint of new kernels (kvm_exit(vcpu, isa)).  This host's KVM never
fires kvm_exit, so counting is checked with the raw program of old kernels
(kvm_exit(exit_reason, vcpu, isa)), which loads here but does not attach:
BPF_PROG_TEST_RUN runs it in the kernel from threads of this process pinned
to chosen CPUs (tests/helpers/bpfrun.py), each run one kvm_exit event with the
exit reason and isa we choose.  Counts are then read back with
kvmexit.snapshot() and printed with print_report()."""

import io
import os
import struct

import numpy as np
import pytest

import kvmexit
from helpers import print_report, row, text_lines

VMX, SVM = kvmexit.ISA_VMX, kvmexit.ISA_SVM
PID = os.getpid()
UNKNOWN = kvmexit.VCPU_ID_UNKNOWN
TRACEPOINT = kvmexit.Probe("tracepoint", "test", tp_vcpu_id=True)
RAW_OLD = kvmexit.Probe("raw-old", "test")
RAW_NEW_SVM = kvmexit.Probe("raw-new", "test", {
    "SVM_VCPU_OFF": 0, "SVM_VMCB_OFF": 5888, "VMCB_EXIT_CODE_OFF": 112})
RAW_NEW_VMX = kvmexit.Probe("raw-new", "test", {
    "VMX_VCPU_OFF": 0, "VMX_EXIT_REASON_OFF": 6400, "KVM_VCPU_ID_OFF": 160})
ALL = kvmexit.Selection("all threads", "all")


def pid_tgid(tid):
    return PID << 32 | tid


class Program:
    """A loaded kvmexit program and views of its maps."""

    def __init__(self, bcc, probe=RAW_OLD, selection=ALL,
                 layout=kvmexit.SVM_LAYOUT, max_threads=64):
        self.layout, self.selection = layout, selection
        self.ncpus = kvmexit.possible_cpus()
        self.program = kvmexit.Program(probe, selection, max_threads, layout)
        self.b = kvmexit.load_program(self.program)
        self.fd = self.b.load_func(b"raw_kvm_exit",
                                   bcc.BPF.RAW_TRACEPOINT).fd \
            if probe.kind != "tracepoint" else None

    def snap(self):
        return kvmexit.snapshot(self.b, self.program, self.ncpus)

    def cache(self):
        """Each CPU's cache slot: (pid_tgid, isa, slot counters)."""
        _, values = kvmexit.read_map(self.b, kvmexit.CACHE_MAP, self.layout,
                                     self.ncpus, keys=[bytes(4)])
        return [(int(v[0]), int(v[1]) >> 32, v[2:]) for v in values[0]]

    def table(self):
        """The thread table: {pid_tgid: uint64 [cpu][header + slots]}."""
        keys, values = kvmexit.read_map(self.b, kvmexit.THREAD_MAP,
                                        self.layout, self.ncpus)
        return {int.from_bytes(k, "little"): v for k, v in zip(keys, values)}

    def rare(self):
        """The rare codes table: {(pid_tgid, isa, code): total}."""
        keys, values = kvmexit.read_map(self.b, kvmexit.RARE_MAP,
                                        self.layout, self.ncpus)
        return {(int.from_bytes(k[:8], "little"),
                 int.from_bytes(k[8:12], "little"),
                 int.from_bytes(k[12:], "little")): int(v.sum())
                for k, v in zip(keys, values)}

    def slot(self, code):
        return [s for s in range(self.layout.slots)
                if self.layout.code(s) == code][0]

    def report(self, snap, selection=None):
        out = io.StringIO()
        print_report(selection or self.selection, snap,
                             kvmexit.ReasonNames(), out=out)
        return out.getvalue()

    def close(self):
        self.b.cleanup()


def no_loss(snap):
    return [0] * len(snap.lost)


def lost(snap, table_full=0, rare_full=0, unreadable=0):
    return [table_full, rare_full, unreadable] + [0] * (len(snap.lost) - 3)


def mine(counts, *tids):
    return {k: v for k, v in counts.items() if k[0] == PID and k[1] in tids}


@pytest.fixture(scope="module")
def svm_prog(bcc, cpus_0_1):
    """One unfiltered raw-old program, SVM slot layout, shared by the
    counting tests: each uses new threads and counts since its start."""
    prog = Program(bcc)
    yield prog
    prog.close()


@pytest.fixture(scope="module")
def vmx_prog(bcc, cpus_0_1):
    prog = Program(bcc, layout=kvmexit.VMX_LAYOUT)
    yield prog
    prog.close()


@pytest.fixture
def fresh(bcc, cpus_0_1):
    """A program of its own, for filters and full tables."""
    made = []

    def load(**kw):
        made.append(Program(bcc, **kw))
        return made[-1]

    yield load
    for prog in made:
        prog.close()


#
# Loading and attaching
#
def test_tracepoint_probe_loads_and_attaches(bcc):
    prog = Program(bcc, probe=TRACEPOINT)
    try:
        assert list(prog.b.tracepoint_fds) == [b"kvm:kvm_exit"]
        assert prog.b.num_open_tracepoints() == 1
        snap = prog.snap()
        assert (snap.counts, snap.lost) == ({}, no_loss(snap))
    finally:
        prog.close()


@pytest.mark.parametrize("probe", [RAW_NEW_SVM, RAW_NEW_VMX],
                         ids=["svm", "vmx"])
def test_raw_new_probe_loads_and_attaches_with_attach_raw(bcc, probe):
    prog = Program(bcc, probe=probe)
    try:
        assert prog.b.raw_tracepoint_fds == {}
        kvmexit.attach_raw(prog.b)
        assert list(prog.b.raw_tracepoint_fds) == [b"kvm_exit"]
        assert prog.b.num_open_tracepoints() == 0
    finally:
        prog.close()


def test_raw_old_probe_loads_but_this_kernel_refuses_to_attach_it(bcc):
    # kvm_exit has two arguments here; the program reads a third.
    prog = Program(bcc, probe=RAW_OLD)
    try:
        assert prog.fd > 0
        with pytest.raises(Exception):
            kvmexit.attach_raw(prog.b)
        assert prog.b.raw_tracepoint_fds == {}
    finally:
        prog.close()


def test_start_tracing_falls_back_to_the_tracepoint_if_raw_is_refused(bcc):
    fallback = kvmexit.Probe("tracepoint", "fallback, the raw tracepoint "
                             "did not attach", tp_vcpu_id=True)
    probe = kvmexit.Probe("raw-old", "kernel BTF: kvm_exit(exit_reason, "
                          "vcpu, isa) passes the exit reason",
                          fallback=fallback)
    b, chosen = kvmexit.start_tracing(kvmexit.Program(probe, ALL, 64,
                                                      kvmexit.SVM_LAYOUT))
    chosen = chosen.probe
    try:
        assert chosen is fallback
        assert chosen.why.startswith("fallback, the raw tracepoint did not "
                                     "attach (")
        assert list(b.tracepoint_fds) == [b"kvm:kvm_exit"]
        assert b.raw_tracepoint_fds == {}
    finally:
        b.cleanup()


def test_start_tracing_with_raw_asked_for_does_not_fall_back(bcc):
    # What choose_probe() makes of --probe raw: a raw probe, no fallback.
    probe = kvmexit.Probe("raw-old", "kernel BTF: kvm_exit(exit_reason, "
                          "vcpu, isa) passes the exit reason",
                          requested="raw")
    with pytest.raises(kvmexit.Error) as exc:
        kvmexit.start_tracing(kvmexit.Program(probe, ALL, 64,
                                              kvmexit.SVM_LAYOUT))
    assert str(exc.value).startswith("cannot attach the raw tracepoint: ")


@pytest.mark.parametrize("isa", [SVM, VMX])
def test_raw_new_exit_with_an_unreadable_reason_is_counted_as_lost(
        fresh, threads, isa):
    # A NULL vcpu: the program cannot read the exit code behind it.
    prog = fresh(probe=RAW_NEW_SVM)
    a = threads()
    a.exits(prog.fd, 0, 0, isa, times=3)
    snap = prog.snap()
    assert snap.counts == {}
    assert snap.lost == lost(snap, unreadable=3)
    assert prog.table() == {} and prog.rare() == {}


#
# Counting: cache hits, eviction, CPU moves, rare codes
#
def test_one_thread_on_one_cpu_counts_in_the_cache_slot(svm_prog, threads):
    before = svm_prog.snap()
    a = threads()
    a.exits(svm_prog.fd, 0, 0x7b, SVM, times=5)
    a.exits(svm_prog.fd, 0, 0x78, SVM, times=1)
    a.exits(svm_prog.fd, 0, 0x7b, SVM, times=2)
    snap = svm_prog.snap()
    assert mine(snap.minus(before).counts, a.tid) == {
        (PID, a.tid, SVM, 0x7b): 7, (PID, a.tid, SVM, 0x78): 1}
    assert snap.lost == no_loss(snap)
    # Cache hits: CPU 0's slot holds the thread and all its counts; its
    # thread table entry is the blank one it was inserted with.
    key, isa, slots = svm_prog.cache()[0]
    assert (key, isa) == (pid_tgid(a.tid), SVM)
    assert int(slots[svm_prog.slot(0x7b)]) == 7
    assert int(slots[svm_prog.slot(0x78)]) == 1
    assert int(slots.sum()) == 8
    assert int(svm_prog.table()[pid_tgid(a.tid)][:, 1:].sum()) == 0


def test_two_threads_alternating_on_one_cpu_evict_into_the_hash(svm_prog,
                                                                threads):
    before = svm_prog.snap()
    a, b = threads(2)
    for _ in range(4):
        a.exits(svm_prog.fd, 0, 0x7b, SVM, times=3)
        b.exits(svm_prog.fd, 0, 0x78, SVM, times=2)
        b.exits(svm_prog.fd, 0, 0x400, SVM, times=1)
    snap = svm_prog.snap()
    assert mine(snap.minus(before).counts, a.tid, b.tid) == {
        (PID, a.tid, SVM, 0x7b): 12,
        (PID, b.tid, SVM, 0x78): 8, (PID, b.tid, SVM, 0x400): 4}
    assert snap.lost == no_loss(snap)
    # b exited last: it is in CPU 0's cache; a was evicted with all its
    # counts into the thread table; b's entry holds its counts as of its
    # last eviction (3 rounds).
    key, _, slots = svm_prog.cache()[0]
    assert key == pid_tgid(b.tid)
    assert (int(slots[svm_prog.slot(0x78)]),
            int(slots[svm_prog.slot(0x400)])) == (8, 4)
    table = svm_prog.table()
    assert int(table[pid_tgid(a.tid)][0, 1 + svm_prog.slot(0x7b)]) == 12
    assert int(table[pid_tgid(b.tid)][0, 1 + svm_prog.slot(0x78)]) == 6
    assert int(table[pid_tgid(b.tid)][0, 1 + svm_prog.slot(0x400)]) == 3


def test_two_threads_alternating_report(svm_prog, threads):
    before = svm_prog.snap()
    a, b = threads(2)
    for _ in range(3):
        a.exits(svm_prog.fd, 0, 0x7b, SVM, times=2)
        b.exits(svm_prog.fd, 0, 0x78, SVM, times=1)
    a.exits(svm_prog.fd, 0, 0x60, SVM, times=1)
    snap = svm_prog.snap().minus(before)
    assert svm_prog.report(snap) == text_lines(
        "PID      TID      KVM_EXIT_REASON                     COUNT",
        row(PID, a.tid, "IOIO", 6),
        row(PID, a.tid, "INTR", 1),
        row(PID, b.tid, "HLT", 3))


def test_one_thread_moving_between_cpus(svm_prog, threads):
    before = svm_prog.snap()
    a = threads()
    a.exits(svm_prog.fd, 0, 0x7b, SVM, times=3)
    a.exits(svm_prog.fd, 1, 0x7b, SVM, times=2)
    a.exits(svm_prog.fd, 0, 0x400, SVM, times=1)
    a.exits(svm_prog.fd, 1, 0x78, SVM, times=4)
    a.exits(svm_prog.fd, 0, 0x7b, SVM, times=1)
    snap = svm_prog.snap()
    assert mine(snap.minus(before).counts, a.tid) == {
        (PID, a.tid, SVM, 0x7b): 6, (PID, a.tid, SVM, 0x400): 1,
        (PID, a.tid, SVM, 0x78): 4}
    assert snap.lost == no_loss(snap)
    # Each CPU's cache slot holds that CPU's share.
    cache = svm_prog.cache()
    assert [c[0] for c in cache[:2]] == [pid_tgid(a.tid)] * 2
    assert [int(cache[0][2][svm_prog.slot(c)]) for c in (0x7b, 0x400,
                                                         0x78)] == [4, 1, 0]
    assert [int(cache[1][2][svm_prog.slot(c)]) for c in (0x7b, 0x400,
                                                         0x78)] == [2, 0, 4]
    assert svm_prog.report(snap.minus(before), kvmexit.Selection(
        "TID %d" % a.tid, "tid", tids=[a.tid])) == text_lines(
        "KVM_EXIT_REASON                     COUNT",
        row("IOIO", 6), row("HLT", 4), row("NPF", 1))


def test_two_threads_moving_across_both_cpus(svm_prog, threads):
    before = svm_prog.snap()
    a, b = threads(2)
    for cpu in (0, 1, 0, 1, 1, 0):
        a.exits(svm_prog.fd, cpu, 0x7b, SVM, times=2)
        b.exits(svm_prog.fd, 1 - cpu, 0x7b, SVM, times=1)
        b.exits(svm_prog.fd, cpu, 0x78, SVM, times=1)
    snap = svm_prog.snap()
    assert mine(snap.minus(before).counts, a.tid, b.tid) == {
        (PID, a.tid, SVM, 0x7b): 12,
        (PID, b.tid, SVM, 0x7b): 6, (PID, b.tid, SVM, 0x78): 6}
    assert snap.lost == no_loss(snap)


def test_rare_vmx_codes_are_counted_exactly_in_the_rare_table(vmx_prog,
                                                              threads):
    before = vmx_prog.snap()
    a = threads()
    a.exits(vmx_prog.fd, 0, 0x9999, VMX, times=1)
    a.exits(vmx_prog.fd, 1, 0x9999, VMX, times=2)
    a.exits(vmx_prog.fd, 0, 0x80000030, VMX, times=2)
    a.exits(vmx_prog.fd, 0, 30, VMX, times=4)
    a.exits(vmx_prog.fd, 0, 96, VMX, times=1)           # first beyond slots
    snap = vmx_prog.snap()
    assert mine(snap.minus(before).counts, a.tid) == {
        (PID, a.tid, VMX, 0x9999): 3, (PID, a.tid, VMX, 0x80000030): 2,
        (PID, a.tid, VMX, 30): 4, (PID, a.tid, VMX, 96): 1}
    assert snap.lost == no_loss(snap)
    rare = {k: v for k, v in vmx_prog.rare().items()
            if k[0] == pid_tgid(a.tid)}
    assert rare == {(pid_tgid(a.tid), VMX, 0x9999): 3,
                    (pid_tgid(a.tid), VMX, 0x80000030): 2,
                    (pid_tgid(a.tid), VMX, 96): 1}
    assert vmx_prog.report(snap.minus(before), kvmexit.Selection(
        "TID %d" % a.tid, "tid", tids=[a.tid])) == text_lines(
        "KVM_EXIT_REASON                     COUNT",
        row("IO_INSTRUCTION", 4),
        row("39321", 3),
        row("EPT_VIOLATION|FAILED_VMENTRY", 2),
        row("96", 1))


def test_svm_codes_at_the_edges_of_the_slots(svm_prog, threads):
    before = svm_prog.snap()
    a = threads()
    for code, times in ((0x0, 1), (0xaf, 2), (0xb0, 3), (0x3ff, 1),
                        (0x400, 2), (0x40f, 1), (0x410, 4),
                        (0xffffffff, 1), (0x80000001, 2)):
        a.exits(svm_prog.fd, 0, code, SVM, times=times)
    snap = svm_prog.snap()
    assert mine(snap.minus(before).counts, a.tid) == {
        (PID, a.tid, SVM, c): n for c, n in (
            (0x0, 1), (0xaf, 2), (0xb0, 3), (0x3ff, 1), (0x400, 2),
            (0x40f, 1), (0x410, 4), (0xffffffff, 1), (0x80000001, 2))}
    rare = {k[2]: v for k, v in svm_prog.rare().items()
            if k[0] == pid_tgid(a.tid)}
    assert rare == {0xb0: 3, 0x3ff: 1, 0x410: 4, 0xffffffff: 1,
                    0x80000001: 2}
    assert snap.lost == no_loss(snap)


def test_raw_old_knows_no_vcpu_id(svm_prog, threads):
    a = threads()
    a.exits(svm_prog.fd, 0, 0x7b, SVM, times=1)
    assert svm_prog.snap().vcpu_ids[(PID, a.tid)] == UNKNOWN


#
# Filters: what the user did not ask for is counted nowhere
#
def fire_all(prog, a, b, c=None):
    """The same exits from each thread, on both CPUs, with a rare code."""
    for t in (a, b, c):
        if t is not None:
            t.exits(prog.fd, 0, 0x7b, SVM, times=3)
            t.exits(prog.fd, 1, 0x78, SVM, times=2)
            t.exits(prog.fd, 0, 0x9999, SVM, times=1)


def assert_nothing_but(prog, snap, *tids):
    keys = {pid_tgid(t) for t in tids}
    assert {(k[0], k[1]) for k in snap.counts} == {(PID, t) for t in tids}
    assert set(prog.table()) == keys
    assert {k[0] for k in prog.rare()} == keys
    assert {c[0] for c in prog.cache()} <= keys | {0}
    assert snap.lost == no_loss(snap)


def test_pid_filter_of_this_process_counts_all_its_threads(fresh, threads):
    sel = kvmexit.Selection("PID %d" % PID, "pid", tgid=PID)
    prog = fresh(selection=sel)
    a, b = threads(2)
    fire_all(prog, a, b)
    snap = prog.snap()
    assert snap.counts == {
        (PID, t, SVM, c): n for t in (a.tid, b.tid)
        for c, n in ((0x7b, 3), (0x78, 2), (0x9999, 1))}
    assert_nothing_but(prog, snap, a.tid, b.tid)
    assert prog.report(snap) == text_lines(
        "KVM_EXIT_REASON                     COUNT",
        row("IOIO", 6), row("HLT", 4), row("0x9999", 2))


def test_pid_filter_of_another_process_counts_nothing(fresh, threads):
    sel = kvmexit.Selection("PID 1", "pid", tgid=1)
    prog = fresh(selection=sel)
    a, b = threads(2)
    fire_all(prog, a, b)
    snap = prog.snap()
    assert snap.counts == {}
    assert prog.table() == {} and prog.rare() == {}
    assert [c[0] for c in prog.cache()] == [0] * prog.ncpus
    assert snap.lost == no_loss(snap)
    assert prog.report(snap) == "KVM_EXIT_REASON                     COUNT\n"


def test_pid_alltids_report(fresh, threads):
    sel = kvmexit.Selection("PID %d and its all threads" % PID, "alltids",
                            tgid=PID)
    prog = fresh(selection=sel)
    a, b = threads(2)
    a.exits(prog.fd, 0, 0x7b, SVM, times=2)
    b.exits(prog.fd, 0, 0x78, SVM, times=5)
    b.exits(prog.fd, 1, 0x7b, SVM, times=1)
    snap = prog.snap()
    assert prog.report(snap) == text_lines(
        "TID      KVM_EXIT_REASON                     COUNT",
        row(a.tid, "IOIO", 2),
        row(b.tid, "HLT", 5),
        row(b.tid, "IOIO", 1))


def test_tid_filter_counts_that_thread_only(fresh, threads):
    a, b = threads(2)
    prog = fresh(selection=kvmexit.Selection("TID %d" % b.tid, "tid",
                                             tids=[b.tid]))
    fire_all(prog, a, b)
    snap = prog.snap()
    assert snap.counts == {(PID, b.tid, SVM, 0x7b): 3,
                           (PID, b.tid, SVM, 0x78): 2,
                           (PID, b.tid, SVM, 0x9999): 1}
    assert_nothing_but(prog, snap, b.tid)
    assert prog.report(snap) == text_lines(
        "KVM_EXIT_REASON                     COUNT",
        row("IOIO", 3), row("HLT", 2), row("0x9999", 1))


def test_tids_filter_counts_the_listed_threads_only(fresh, threads):
    a, b, c = threads(3)
    sel = kvmexit.Selection("TIDS %s" % ([str(c.tid), str(a.tid)],), "tids",
                            tids=[c.tid, a.tid])
    prog = fresh(selection=sel)
    fire_all(prog, a, b, c)
    c.exits(prog.fd, 1, 0x400, SVM, times=7)
    snap = prog.snap()
    assert snap.counts == {
        (PID, a.tid, SVM, 0x7b): 3, (PID, a.tid, SVM, 0x78): 2,
        (PID, a.tid, SVM, 0x9999): 1,
        (PID, c.tid, SVM, 0x7b): 3, (PID, c.tid, SVM, 0x78): 2,
        (PID, c.tid, SVM, 0x9999): 1, (PID, c.tid, SVM, 0x400): 7}
    assert_nothing_but(prog, snap, a.tid, c.tid)
    assert prog.report(snap) == text_lines(
        "TIDS     KVM_EXIT_REASON                     COUNT",
        row(a.tid, "IOIO", 3), row(a.tid, "HLT", 2),
        row(a.tid, "0x9999", 1),
        row(c.tid, "NPF", 7), row(c.tid, "IOIO", 3), row(c.tid, "HLT", 2),
        row(c.tid, "0x9999", 1))


def test_tids_filter_of_12500_tids_around_the_listed_ones(fresh, threads):
    # 12,500 TIDs made clang crash when they were a chain of comparisons;
    # in the bitmap they cost one lookup.  The list holds a and c and every
    # TID near b (same 64-bit word, neighbours), but not b itself.
    a, b, c = threads(3)
    limit = kvmexit.pid_max()
    near = [t for t in range(b.tid - 70, b.tid + 71)
            if 0 < t < limit and t != b.tid]
    others = [t for t in range(1, limit) if t not in (a.tid, b.tid, c.tid)
              and abs(t - b.tid) > 70][:12500 - 2 - len(near)]
    tids = [a.tid, c.tid] + near + others
    assert len(tids) == 12500 and b.tid not in tids
    sel = kvmexit.Selection("TIDS (12500)", "tids", tids=tids)
    assert sel.kernel_filter() == ["-DFILTER_TIDS"]
    prog = fresh(selection=sel)
    fire_all(prog, a, b, c)
    snap = prog.snap()
    assert snap.counts == {
        (PID, t, SVM, code): n for t in (a.tid, c.tid)
        for code, n in ((0x7b, 3), (0x78, 2), (0x9999, 1))}
    assert_nothing_but(prog, snap, a.tid, c.tid)


def test_tid_filter_bitmap_has_one_bit_per_listed_tid(fresh, threads):
    a = threads()
    many = kvmexit.Selection.CHAIN_MAX_TIDS + 1
    tids = [1, 63, 64, 65, a.tid] + [t for t in range(1000, 1000 + many)
                                     if t != a.tid][:many - 5]
    prog = fresh(selection=kvmexit.Selection("x", "tids", tids=tids))
    words = {k.value: v.value for k, v in prog.b[b"tid_filter"].items()
             if v.value}
    want = {}
    for t in tids:
        want[t // 64] = want.get(t // 64, 0) | 1 << (t % 64)
    assert words == want
    assert len(prog.b[b"tid_filter"]) == (kvmexit.pid_max() + 63) // 64


def test_vcpu_filter_of_a_qemu_vcpu_thread(fresh, threads):
    a, b = threads(2)
    sel = kvmexit.Selection("PID %d VCPU 1" % PID, "vcpu", tids=[a.tid],
                            vcpu=1)
    prog = fresh(selection=sel)
    fire_all(prog, a, b)
    a.exits(prog.fd, 1, 0x60, SVM, times=4)
    snap = prog.snap()
    assert snap.counts == {(PID, a.tid, SVM, 0x7b): 3,
                           (PID, a.tid, SVM, 0x78): 2,
                           (PID, a.tid, SVM, 0x9999): 1,
                           (PID, a.tid, SVM, 0x60): 4}
    assert_nothing_but(prog, snap, a.tid)
    assert prog.report(snap) == text_lines(
        "KVM_EXIT_REASON                     COUNT",
        row("INTR", 4), row("IOIO", 3), row("HLT", 2), row("0x9999", 1))


def test_all_threads_report_of_a_fresh_program(fresh, threads):
    prog = fresh()
    a, b = threads(2)
    b.exits(prog.fd, 0, 0x7b, SVM, times=2)
    a.exits(prog.fd, 1, 0x14, SVM, times=1)
    a.exits(prog.fd, 0, 0x04, SVM, times=1)
    a.exits(prog.fd, 0, 0x78, SVM, times=3)
    snap = prog.snap()
    assert prog.report(snap) == text_lines(
        "PID      TID      KVM_EXIT_REASON                     COUNT",
        row(PID, a.tid, "HLT", 3),
        row(PID, a.tid, "READ_CR4", 1),
        row(PID, a.tid, "WRITE_CR4", 1),
        row(PID, b.tid, "IOIO", 2))


#
# Full tables
#
def test_a_full_thread_table_loses_the_new_threads_exits(fresh, threads):
    prog = fresh(max_threads=2)
    a, b, c = threads(3)
    a.exits(prog.fd, 0, 0x7b, SVM, times=2)
    b.exits(prog.fd, 0, 0x7b, SVM, times=3)
    c.exits(prog.fd, 0, 0x7b, SVM, times=4)
    c.exits(prog.fd, 1, 0x78, SVM, times=1)
    a.exits(prog.fd, 0, 0x78, SVM, times=1)
    snap = prog.snap()
    assert snap.counts == {(PID, a.tid, SVM, 0x7b): 2,
                           (PID, a.tid, SVM, 0x78): 1,
                           (PID, b.tid, SVM, 0x7b): 3}
    assert snap.lost == lost(snap, table_full=5)


def test_a_full_rare_table_loses_only_new_rare_codes(fresh, threads):
    prog = fresh()
    a = threads()

    def job():
        from helpers.bpfrun import test_run
        os.sched_setaffinity(0, {0})
        for code in range(0x1000, 0x1000 + kvmexit.MAX_RARE + 5):
            test_run(prog.fd, [code, 0, SVM])
        test_run(prog.fd, [0x1000, 0, SVM])     # known: still counted
    a.call(job)
    snap = prog.snap()
    rare = mine(snap.counts, a.tid)
    assert len(rare) == kvmexit.MAX_RARE
    assert rare[(PID, a.tid, SVM, 0x1000)] == 2
    assert sum(rare.values()) == kvmexit.MAX_RARE + 1
    assert snap.lost == lost(snap, rare_full=5)


#
# Merging cache slots and the thread table (pure numpy)
#
def counters(*rows):
    """uint64 [cpu][header + 3 slots]; header = isa << 32 | vcpu_id."""
    return np.array(rows, dtype=np.uint64)


def header(isa, vcpu):
    return isa << 32 | vcpu


def test_merge_takes_the_cache_slot_when_newer_than_the_table():
    a, b = pid_tgid(11), pid_tgid(12)
    values = np.stack([
        counters([header(SVM, 0), 5, 0, 1], [header(SVM, 0), 2, 0, 0]),
        counters([header(SVM, 1), 0, 3, 0], [0, 0, 0, 0]),
    ])
    # CPU 0's slot holds a, newer (7 > 5); CPU 1's holds b (not in the
    # table on CPU 1 yet).
    cache_keys = [a, b]
    cache_values = counters([header(SVM, 0), 7, 0, 1],
                            [header(SVM, 1), 0, 4, 2])
    keys, sums, hdr = kvmexit.merge_thread_counts([a, b], values.copy(),
                                                  cache_keys, cache_values)
    assert keys == [a, b]
    assert sums.tolist() == [[7 + 2, 0, 1], [0, 3 + 4, 2]]
    assert [int(h) for h in hdr] == [header(SVM, 0), header(SVM, 1)]


def test_merge_keeps_the_table_when_the_cache_slot_is_older():
    a = pid_tgid(11)
    values = np.stack([counters([header(VMX, 2), 9, 9, 9],
                                [header(VMX, 2), 1, 0, 0])])
    cache_values = counters([header(VMX, 2), 4, 9, 2], [0, 0, 0, 0])
    keys, sums, _ = kvmexit.merge_thread_counts([a], values, [a, 0],
                                                cache_values)
    assert sums.tolist() == [[10, 9, 9]]


def test_merge_adds_a_thread_found_only_in_a_cache_slot():
    a, c = pid_tgid(11), pid_tgid(13)
    values = np.stack([counters([header(SVM, 0), 1, 0, 0], [0, 0, 0, 0])])
    cache_values = counters([header(SVM, 5), 0, 2, 0],
                            [header(SVM, 5), 0, 0, 6])
    keys, sums, hdr = kvmexit.merge_thread_counts([a], values, [c, c],
                                                  cache_values)
    assert keys == [a, c]
    assert sums.tolist() == [[1, 0, 0], [0, 2, 6]]
    assert [int(h) for h in hdr] == [header(SVM, 0), header(SVM, 5)]


def test_merge_header_comes_from_a_cpu_the_thread_exited_on():
    a = pid_tgid(11)
    values = np.stack([counters([0, 0, 0, 0], [header(VMX, 3), 0, 1, 0])])
    keys, sums, hdr = kvmexit.merge_thread_counts(
        [a], values, [0, 0], counters([0] * 4, [0] * 4))
    assert [int(h) for h in hdr] == [header(VMX, 3)]
    assert sums.tolist() == [[0, 1, 0]]


def test_merge_of_nothing():
    values = np.zeros((0, 2, 4), dtype=np.uint64)
    keys, sums, hdr = kvmexit.merge_thread_counts(
        [], values, [0, 0], np.zeros((2, 4), dtype=np.uint64))
    assert (keys, sums.shape, len(hdr)) == ([], (0, 3), 0)


@pytest.mark.parametrize("spec, wrong", [
    # A key of another size, the same size with other fields, a value of
    # another size.
    (kvmexit.RARE_MAP, {"key": kvmexit.Key(struct.Struct("<QQ"),
                                           ("pid_tgid", "isa_code"))}),
    (kvmexit.RARE_MAP, {"key": kvmexit.Key(struct.Struct("<QII"),
                                           ("pid_tgid", "code", "isa"))}),
    (kvmexit.THREAD_MAP, {"words": lambda layout: layout.words + 1}),
])
def test_a_map_spec_unlike_the_c_is_refused_at_load(bcc, monkeypatch, spec,
                                                    wrong):
    monkeypatch.setattr(kvmexit, "MAPS", tuple(
        m._replace(**wrong) if m is spec else m for m in kvmexit.MAPS))
    with pytest.raises(kvmexit.Error) as exc:
        kvmexit.load_program(kvmexit.Program(RAW_OLD, ALL, 64,
                                             kvmexit.SVM_LAYOUT))
    key = "('pid_tgid', 'isa', 'code') [8, 4, 4], value 8 B" \
        if spec is kvmexit.RARE_MAP else "None [8], value 1544 B"
    assert str(exc.value) == "map %s of %s is not as kvmexit.py reads it " \
        "(key %s): a bug in kvmexit" % (spec.name.decode(),
                                        kvmexit.bpf_source(), key)


def test_every_map_spec_matches_the_c_with_every_feature(bcc):
    program = kvmexit.Program(
        kvmexit.Probe("tracepoint", "test", tp_vcpu_id=True), ALL, 64,
        kvmexit.SVM_LAYOUT, {feature.name for feature in kvmexit.FEATURES})
    b = kvmexit.load_program(program)
    try:
        assert [m.name for m in program.maps()] == [
            m.name for m in kvmexit.MAPS]
    finally:
        b.cleanup()
