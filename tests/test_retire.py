"""Retirement: the threads of ended VMs give their table room back, and
nothing they counted is lost.

kvmexit's program (raw-old mode, SVM layout) runs through
BPF_PROG_TEST_RUN from threads of this process pinned to CPUs 0 and 1
(tests/helpers/bpfrun.py): each test run is one kvm_exit of that thread on that
CPU.  Threads that have ended stand for the vCPU threads of ended VMs;
kvmexit.Ledger retires them as the tool does, every second.

Runs as root on the real kernel, never skipped (see conftest.py)."""

import os
import threading
import time

import pytest

from helpers import bpfrun
import kvmexit

SVM = kvmexit.ISA_SVM
PID = os.getpid()
IOIO, HLT, INTR = 0x7b, 0x78, 0x60
RARE = 0x9999               # no slot in either layout: the rare table
LOST = {macro: i for i, (macro, _) in enumerate(kvmexit.LOST)}


def program(max_threads, latency=False):
    return kvmexit.Program(kvmexit.Probe("raw-old", "test"),
                           kvmexit.Selection("all threads", "all"),
                           max_threads, kvmexit.SVM_LAYOUT,
                           {"latency"} if latency else ())


def load(bcc, max_threads, latency=False):
    b = kvmexit.load_program(program(max_threads, latency))
    b.fd = b.load_func(b"raw_kvm_exit", bcc.BPF.RAW_TRACEPOINT).fd
    return b


@pytest.fixture
def loaded(bcc, cpus_0_1):
    made = []

    def make(max_threads, latency=False):
        made.append(load(bcc, max_threads, latency))
        b = made[-1]
        return b, kvmexit.ThreadTables(b, program(max_threads, latency),
                                       kvmexit.possible_cpus())

    yield make
    for b in made:
        b.cleanup()


def gone(tid):
    """Wait until the ended thread has left /proc (join() returns a moment
    before the kernel reaps it)."""
    path = "/proc/%d/task/%d" % (PID, tid)
    deadline = time.monotonic() + 5
    while os.path.exists(path):
        assert time.monotonic() < deadline, path
        time.sleep(0.001)


def ended_thread(fd, events):
    """A new thread fires events [(cpu, code, times)] and ends; its tid."""
    def body(tid):
        for cpu, code, times in events:
            os.sched_setaffinity(0, {cpu})
            for _ in range(times):
                bpfrun.test_run(fd, [code, 0, SVM])
        return tid
    tid = bpfrun.in_thread(events[0][0], body)
    gone(tid)
    return tid


def mine(counts):
    return {k: v for k, v in counts.items() if k[0] == PID}


def thread_keys(tables):
    return {kvmexit.pid_tgid_of(k)
            for k in tables.keys(kvmexit.THREAD_MAP)}


def pid_tgid(tid):
    return PID << 32 | tid


#
# 100,000 threads through a table of 1,024
#
THREADS, BATCH, TABLE = 100_000, 1_000, 1_024


def events_of(i):
    """Thread i exits on its CPU, then on the other one, so that it ends
    held in both cache slots until the next threads evict it; every tenth
    also has a rare code."""
    cpu = i % 2
    events = [(cpu, IOIO, 1 + i % 3), (1 - cpu, HLT, 1)]
    return events + ([(1 - cpu, RARE, 1)] if i % 10 == 0 else [])


def run_batch(fd, first, n):
    """Threads first..first+n-1, one after another, each a new OS thread
    that ends; returns their expected counts."""
    expected = {}

    def body(i):
        tid = threading.get_native_id()
        for cpu, code, times in events_of(i):
            os.sched_setaffinity(0, {cpu})
            for _ in range(times):
                bpfrun.test_run(fd, [code, 0, SVM])
            key = (PID, tid, SVM, code)
            expected[key] = expected.get(key, 0) + times

    for i in range(first, first + n):
        t = threading.Thread(target=body, args=(i,))
        t.start()
        t.join()
    return expected


def test_100000_threads_through_a_1024_thread_table_lose_nothing(loaded):
    b, tables = loaded(TABLE)
    ledger = kvmexit.Ledger()
    earlier = None
    rare_max = b[b"pcpu_rare_stat"].max_entries
    assert rare_max < THREADS // 10        # the rare table must be retired
    total = 0
    for first in range(0, THREADS, BATCH):
        expected = run_batch(b.fd, first, BATCH)
        # As `kvmexit -i` does: retire, read, report the interval, and
        # start the next one without what the report showed.
        snap = ledger.read(tables, take=True)
        shown = snap if earlier is None else snap.minus(earlier)
        assert mine(shown.counts) == expected, "batch from %d" % first
        assert shown.lost == [0] * len(kvmexit.LOST)
        earlier = kvmexit.without_retired(snap)
        total += sum(expected.values())
        # Flat memory: the table holds at most a batch and the few threads
        # that were still leaving /proc or held in a cache slot; the
        # ledger gave everything to the report.
        assert len(thread_keys(tables)) <= TABLE
        assert ledger.size() == 0
    # 1 + i % 3 port writes, 1 HLT, and a rare code for every tenth.
    assert total == sum(2 + i % 3 + (i % 10 == 0) for i in range(THREADS))
    assert earlier.lost == [0] * len(kvmexit.LOST)


#
# The cache slots
#
def test_a_dead_thread_held_in_idle_cache_slots_is_retired_at_once(
        loaded, threads):
    b, tables = loaded(16)
    ledger = kvmexit.Ledger()
    a = ended_thread(b.fd, [(0, IOIO, 2), (1, HLT, 1)])
    expected = {(PID, a, SVM, IOIO): 2, (PID, a, SVM, HLT): 1}
    assert tables.cached_threads() >= {pid_tgid(a)}

    # Held on CPUs 0 and 1, which see no other exit: retired all the same,
    # its entry kept for the eviction's write-back.
    assert ledger.retire(tables) == 1
    assert ledger.retired["counts"] == expected
    assert pid_tgid(a) in thread_keys(tables)
    assert mine(ledger.read(tables).counts) == expected
    assert ledger.retire(tables) == 0           # once
    live = threads()
    live.exits(b.fd, 0, INTR, SVM)              # evicts a from CPU 0
    assert ledger.retire(tables) == 0
    assert mine(ledger.read(tables).counts) == {
        **expected, (PID, live.tid, SVM, INTR): 1}
    live.exits(b.fd, 1, INTR, SVM)              # and from CPU 1
    assert ledger.retire(tables) == 0           # its entry goes, unadded
    assert thread_keys(tables) == {pid_tgid(live.tid)}
    assert ledger.retired["counts"] == expected
    assert ledger.held == {}
    snap = ledger.read(tables)
    assert mine(snap.counts) == {**expected, (PID, live.tid, SVM, INTR): 2}
    assert snap.lost == [0] * len(kvmexit.LOST)


def test_interval_reports_show_a_held_thread_once(loaded, threads):
    b, tables = loaded(16)
    ledger = kvmexit.Ledger()
    a = ended_thread(b.fd, [(0, IOIO, 3)])
    snap = ledger.read(tables, take=True)
    assert mine(snap.counts) == {(PID, a, SVM, IOIO): 3}
    earlier = kvmexit.without_retired(snap)
    live = threads()
    live.exits(b.fd, 0, HLT, SVM)               # evicts a: written back
    later = ledger.read(tables, take=True)
    assert mine(later.minus(earlier).counts) == {(PID, live.tid, SVM, HLT): 1}
    assert ledger.retire(tables) == 0
    assert mine(ledger.read(tables).counts) == {(PID, live.tid, SVM, HLT): 1}


def test_threads_retired_while_others_exit_on_their_cpus_count_once(
        loaded, threads):
    """Retirement and readers run while live threads keep evicting the
    dead ones from the slots: each exit is counted once, none is lost."""
    b, tables = loaded(256)
    ledger = kvmexit.Ledger()
    busy = [threads(), threads()]
    stop, errors = threading.Event(), []
    fired = [0, 0]

    def evict(n):
        while not stop.is_set():
            busy[n].exits(b.fd, n, INTR, SVM, times=7)
            fired[n] += 7

    def retire():
        try:
            while not stop.is_set():
                ledger.retire(tables)
                ledger.read(tables)
        except Exception as e:          # reported by the test, not lost
            errors.append(e)

    workers = [threading.Thread(target=evict, args=(n,)) for n in (0, 1)]
    workers.append(threading.Thread(target=retire))
    for w in workers:
        w.start()
    expected = {}
    try:
        for i in range(300):
            cpu = i % 2
            tid = ended_thread(b.fd, [(cpu, IOIO, 1 + i % 4),
                                      (1 - cpu, HLT, 1)])
            expected[(PID, tid, SVM, IOIO)] = 1 + i % 4
            expected[(PID, tid, SVM, HLT)] = 1
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert errors == []
    for n in (0, 1):
        expected[(PID, busy[n].tid, SVM, INTR)] = fired[n]
    ledger.retire(tables)
    snap = ledger.read(tables)
    assert mine(snap.counts) == expected
    assert snap.lost == [0] * len(kvmexit.LOST)


def test_readers_never_see_a_thread_twice_or_not_at_all(loaded):
    """Snapshots taken while threads end and are retired: each thread's
    counts are in the tables or in the ledger, so totals only grow, and
    the last one is exact."""
    b, tables = loaded(64)
    ledger = kvmexit.Ledger()
    totals, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            totals.append(sum(mine(ledger.read(tables).counts).values()))

    r = threading.Thread(target=reader)
    r.start()
    expected = {}
    try:
        for first in range(0, 600, 20):
            expected.update(run_batch(b.fd, first, 20))
            ledger.retire(tables)
    finally:
        stop.set()
        r.join()
    final = ledger.read(tables)
    assert mine(final.counts) == expected
    assert len(totals) > 10
    assert totals == sorted(totals)
    assert totals[-1] <= sum(expected.values())
    assert final.lost == [0] * len(kvmexit.LOST)


def test_a_failed_write_back_counts_the_evicted_threads_exits_as_lost(
        loaded, threads):
    # Retirement never deletes a thread a cache slot holds; do it anyway
    # and fill the table, so that the eviction's write-back must fail.
    b, tables = loaded(4)
    held = threads()
    held.exits(b.fd, 0, IOIO, SVM, times=3)     # cached on CPU 0
    tables.delete(kvmexit.THREAD_MAP,
                  [kvmexit.THREAD_KEY.layout.pack(pid_tgid(held.tid))])
    for t in threads(4):
        t.exits(b.fd, 1, HLT, SVM)              # 4 entries: full
    threads().exits(b.fd, 0, INTR, SVM)         # evicts `held` from CPU 0
    lost = kvmexit.Ledger().read(tables).lost
    assert lost[LOST["LOST_WRITE_BACK_FAILED"]] == 3
    assert lost[LOST["LOST_THREAD_TABLE_FULL"]] == 1
    assert sum(lost) == 4


#
# The rare and latency tables
#
def test_rare_codes_of_ended_threads_are_retired_exactly(loaded):
    b, tables = loaded(64)
    ledger = kvmexit.Ledger()
    tids = [ended_thread(b.fd, [(n % 2, RARE + n, 1 + n)]) for n in range(5)]
    assert len(tables.keys(kvmexit.RARE_MAP)) == 5
    ledger.retire(tables)
    assert tables.keys(kvmexit.RARE_MAP) == []
    assert mine(ledger.read(tables).counts) == {
        (PID, tid, SVM, RARE + n): 1 + n for n, tid in enumerate(tids)}


def latency_value(count, total, longest, hist):
    words = [count, total, longest] + hist + \
        [0] * (kvmexit.LAT_BUCKETS - len(hist))
    return b"".join(w.to_bytes(8, "little") for w in words)


def test_latency_of_ended_threads_is_retired_exactly(loaded, threads):
    # kvm_entry, which fills these tables, is a regular tracepoint and
    # cannot be test-run: its entries are written here as it writes them.
    b, tables = loaded(64, latency=True)
    ledger = kvmexit.Ledger()
    dead = ended_thread(b.fd, [(0, IOIO, 1)])
    live = threads()
    for tid, count in ((dead, 3), (live.tid, 5)):
        key = pid_tgid(tid).to_bytes(8, "little") + \
            SVM.to_bytes(4, "little") + IOIO.to_bytes(4, "little")
        b[b"exit_latency"][b[b"exit_latency"].Key.from_buffer_copy(key)] = \
            b[b"exit_latency"].Leaf.from_buffer_copy(
                latency_value(count, 1000 * count, 900, [0] * 9 + [count]))
        b[b"pending_exit"][b[b"pending_exit"].Key(pid_tgid(tid))] = \
            b[b"pending_exit"].Leaf()
    ledger.retire(tables)
    assert [kvmexit.pid_tgid_of(k) for k in tables.keys(
        kvmexit.LATENCY_MAP)] == \
        [pid_tgid(live.tid)]
    assert [kvmexit.pid_tgid_of(k) for k in tables.keys(
        kvmexit.PENDING_MAP)] == \
        [pid_tgid(live.tid)]
    latency = ledger.read(tables).latency
    for tid, count in ((dead, 3), (live.tid, 5)):
        lat = latency[(PID, tid, SVM, IOIO)]
        assert (lat.count, lat.total_ns, lat.max_ns) == (count,
                                                         1000 * count, 900)
        assert lat.hist[9] == count and sum(lat.hist) == count


#
# How long retired counts are kept
#
def ended_process(fd, events):
    """A child process that fires events [(cpu, code, times)] and exits;
    its pid, once reaped."""
    pid = os.fork()
    if pid == 0:
        try:
            for cpu, code, times in events:
                os.sched_setaffinity(0, {cpu})
                for _ in range(times):
                    bpfrun.test_run(fd, [code, 0, SVM])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return pid


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_gone_vm_is_kept_for_the_grace_period_then_dropped(loaded,
                                                             threads):
    b, tables = loaded(16)
    clock = Clock()
    ledger = kvmexit.Ledger(clock=clock)
    child = ended_process(b.fd, [(0, IOIO, 4), (1, HLT, 1)])
    live = threads()
    live.exits(b.fd, 0, IOIO, SVM, times=2)     # evicts the child's thread
    live.exits(b.fd, 1, IOIO, SVM, times=2)
    ledger.retire(tables)
    of = lambda snap, pid: {k: v for k, v in snap.counts.items()
                            if k[0] == pid}
    assert of(ledger.read(tables), child) == {
        (child, child, SVM, IOIO): 4, (child, child, SVM, HLT): 1}
    assert ledger.forget_gone(300) == set()     # first seen gone now
    clock.now += 299
    assert ledger.forget_gone(300) == set()
    assert sum(of(ledger.read(tables), child).values()) == 5
    clock.now += 1
    assert ledger.forget_gone(300) == {child}
    snap = ledger.read(tables)
    assert of(snap, child) == {}
    assert ledger.size() == 0
    # The live process keeps its counts, whatever the time.
    assert mine(snap.counts) == {(PID, live.tid, SVM, IOIO): 4}


def test_a_gone_vm_held_in_idle_cache_slots_leaves_no_series(loaded,
                                                             threads):
    """Its last thread is held in both CPUs' slots and no other thread
    exits there: after the grace period nothing of it is left, and a later
    eviction adds nothing."""
    b, tables = loaded(16)
    clock = Clock()
    ledger = kvmexit.Ledger(clock=clock)
    child = ended_process(b.fd, [(0, IOIO, 5), (1, HLT, 2)])
    assert tables.cached_threads() >= {child << 32 | child}
    ledger.retire(tables)
    def of(snap):
        return {k: v for k, v in snap.counts.items() if k[0] == child}
    assert of(ledger.read(tables)) == {(child, child, SVM, IOIO): 5,
                                       (child, child, SVM, HLT): 2}
    assert ledger.forget_gone(300) == set()
    clock.now += 300
    assert ledger.forget_gone(300) == {child}
    snap = ledger.read(tables)
    assert of(snap) == {}
    assert {k for k in snap.vcpu_ids if k[0] == child} == set()
    live = threads()
    live.exits(b.fd, 0, INTR, SVM)
    live.exits(b.fd, 1, INTR, SVM)
    ledger.retire(tables)
    snap = ledger.read(tables)
    assert of(snap) == {}
    assert mine(snap.counts) == {(PID, live.tid, SVM, INTR): 2}
    assert ledger.size() == 0


def fake_process(proc, pid, start, tids):
    """/proc/PID/stat with this start time, and /proc/PID/task/TID."""
    os.makedirs("%s/%d/task" % (proc, pid), exist_ok=True)
    for tid in tids:
        os.makedirs("%s/%d/task/%d" % (proc, pid, tid), exist_ok=True)
    fields = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 30
    with open("%s/%d/stat" % (proc, pid), "w") as f:
        f.write("%d (qemu (x) y) %s\n" % (pid, " ".join(fields)))


def test_a_reused_pid_drops_the_old_vms_counts_at_once(loaded, tmp_path):
    # A PID cannot be made to come back: /proc is a fake tree here, with
    # the PID of a real child process that counted real exits.
    b, tables = loaded(16)
    proc = str(tmp_path)
    ledger = kvmexit.Ledger(proc=proc, clock=Clock())
    child = ended_process(b.fd, [(0, IOIO, 4)])
    fake_process(proc, child, 1000, [])         # seen running, then gone
    ledger.retire(tables)
    assert sum(ledger.read(tables).counts[k] for k in ledger.read(
        tables).counts if k[0] == child) == 4
    assert ledger.forget_gone(300) == set()
    fake_process(proc, child, 2000, [child])    # a new process, same PID
    assert ledger.forget_gone(300) == {child}
    assert {k for k in ledger.read(tables).counts if k[0] == child} == set()
    assert ledger.size() == 0
    assert ledger.forget_gone(300) == set()     # the new one is kept


def test_process_start_reads_field_22_after_the_name(tmp_path):
    fake_process(str(tmp_path), 42, 123456, [])
    assert kvmexit.process_start(42, str(tmp_path)) == 123456
    assert kvmexit.process_start(43, str(tmp_path)) is None
