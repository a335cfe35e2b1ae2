"""Capacity: nothing is lost silently.

kvmexit's program is loaded with a thread table of 4 (load_program's
max_threads) and overfilled through BPF_PROG_TEST_RUN (tests/helpers/bpfrun.py):
threads pinned to CPUs 0 and 1 of this process, each test run one kvm_exit
of the raw-old probe (exit_reason, vcpu, isa).  The threads that got a
place are counted exactly; every exit of the others is counted as lost,
and kvmexit.warn_lost() says how many.  Exit codes without a counter slot
go to the rare table, which is not limited by the thread table.

Runs as root on the real kernel, never skipped (see conftest.py)."""

import io
import os

import pytest

import kvmexit
from helpers import bpfrun, print_report

SVM = kvmexit.ISA_SVM
PID = os.getpid()
MAX_THREADS = 4
PROGRAM = kvmexit.Program(kvmexit.Probe("raw-old", "test"),
                          kvmexit.Selection("all threads", "all"),
                          MAX_THREADS, kvmexit.SVM_LAYOUT)
RARE = 0x9999               # no slot in either layout: the rare table
TABLE_FULL = 0
RARE_FULL = 1


@pytest.fixture
def prog(bcc, cpus_0_1):
    b = kvmexit.load_program(PROGRAM)
    b.fd = b.load_func(b"raw_kvm_exit", bcc.BPF.RAW_TRACEPOINT).fd
    yield b
    b.cleanup()


def snap_of(b):
    return kvmexit.snapshot(b, PROGRAM, kvmexit.possible_cpus())


def fire(thread, fd, events):
    """events: [(cpu, code, times)], run in this order by `thread`."""
    def job():
        for cpu, code, times in events:
            os.sched_setaffinity(0, {cpu})
            for _ in range(times):
                bpfrun.test_run(fd, [code, 0, SVM])
    thread.call(job)


def mine(snap):
    return {k: v for k, v in snap.counts.items() if k[0] == PID}


def warning(capsys, snap):
    kvmexit.warn_lost(snap)
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err.splitlines()


def test_overfilled_thread_table_counts_the_first_threads_exactly(
        prog, threads, capsys):
    pool = threads(7)
    expected, lost = {}, 0

    def exits(i, t, events):
        """Fire the events; the first MAX_THREADS threads get a place."""
        nonlocal lost
        fire(t, prog.fd, events)
        for cpu, code, times in events:
            if i < MAX_THREADS:
                key = (PID, t.tid, SVM, code)
                expected[key] = expected.get(key, 0) + times
            else:
                lost += times

    # Round 1: every thread exits on both CPUs.
    for i, t in enumerate(pool):
        exits(i, t, [(0, 0x7b, 1 + i), (1, 0x78, 2), (0, 0x400, 1)])
    # Round 2, in reverse: the cache slots now move between known threads
    # and threads without a place, on both CPUs.
    for i, t in reversed(list(enumerate(pool))):
        exits(i, t, [(1, 0x7b, 3), (0, 0x60, 1)])

    snap = snap_of(prog)
    assert mine(snap) == expected
    assert {k[1] for k in mine(snap)} == {t.tid for t in pool[:MAX_THREADS]}
    # Threads 4, 5, 6: (5 + 6 + 7) + 3 x (2 + 1) in round 1, 3 x 4 in 2.
    assert snap.lost[TABLE_FULL] == lost == 39
    assert not any(snap.lost[1:])

    lines = warning(capsys, snap)
    assert len(lines) == 1
    assert lines[0] == "kvmexit: warning: %d exits were not counted: %s" % (
        lost, kvmexit.LOST_REASONS[TABLE_FULL])
    assert "--max-threads" in lines[0]


def test_the_report_shows_only_the_threads_that_fit(prog, threads):
    pool = threads(MAX_THREADS + 1)
    for i, t in enumerate(pool):
        fire(t, prog.fd, [(0, 0x78, i + 1)])
    snap = snap_of(prog)
    out = io.StringIO()
    print_report(kvmexit.Selection("all threads", "all"), snap,
                         kvmexit.ReasonNames(), out=out)
    rows = [r.split() for r in out.getvalue().splitlines()[1:]]
    assert sorted(int(r[1]) for r in rows) == \
        sorted(t.tid for t in pool[:MAX_THREADS])
    assert [int(r[-1]) for r in sorted(rows, key=lambda r: int(r[-1]))] == \
        list(range(1, MAX_THREADS + 1))
    assert snap.lost[TABLE_FULL] == MAX_THREADS + 1


def test_a_table_with_room_loses_nothing_and_warns_nothing(prog, threads,
                                                           capsys):
    pool = threads(MAX_THREADS)
    for t in pool:
        fire(t, prog.fd, [(0, 0x7b, 5), (1, 0x7b, 5)])
    snap = snap_of(prog)
    assert mine(snap) == {(PID, t.tid, SVM, 0x7b): 10 for t in pool}
    assert not any(snap.lost)
    assert warning(capsys, snap) == []


def test_rare_code_is_counted_exactly_even_for_threads_without_a_place(
        prog, threads, capsys):
    pool = threads(MAX_THREADS + 2)
    for t in pool:
        fire(t, prog.fd, [(0, 0x7b, 1)])
    lost = len(pool) - MAX_THREADS
    # The rare table has its own room: 0x9999 of every thread counts,
    # whether or not the thread has a place in the thread table.
    for i, t in enumerate(pool):
        fire(t, prog.fd, [(0, RARE, 2 + i), (1, RARE, 1)])
    snap = snap_of(prog)
    for i, t in enumerate(pool):
        assert snap.counts[(PID, t.tid, SVM, RARE)] == 3 + i
        assert ((PID, t.tid, SVM, 0x7b) in snap.counts) == (i < MAX_THREADS)
    assert snap.lost[TABLE_FULL] == lost
    assert snap.lost[RARE_FULL] == 0
    assert warning(capsys, snap) == [
        "kvmexit: warning: %d exits were not counted: %s"
        % (lost, kvmexit.LOST_REASONS[TABLE_FULL])]


def test_a_full_rare_table_is_counted_as_lost_and_warned(bcc, cpus_0_1,
                                                         threads, capsys,
                                                         monkeypatch):
    monkeypatch.setattr(kvmexit, "MAX_RARE", 8)
    b = kvmexit.load_program(PROGRAM)
    try:
        fd = b.load_func(b"raw_kvm_exit", bcc.BPF.RAW_TRACEPOINT).fd
        t = threads()
        codes = [RARE + n for n in range(10)]      # 8 fit, 2 do not
        fire(t, fd, [(n % 2, code, 2) for n, code in enumerate(codes)])
        fire(t, fd, [(0, RARE, 1)])                 # has a place: counts
        snap = snap_of(b)
    finally:
        b.cleanup()
    got = mine(snap)
    assert got == dict([((PID, t.tid, SVM, RARE), 3)] +
                       [((PID, t.tid, SVM, c), 2) for c in codes[1:8]])
    assert snap.lost[RARE_FULL] == 4
    assert snap.lost[TABLE_FULL] == 0
    assert warning(capsys, snap) == [
        "kvmexit: warning: 4 exits were not counted: %s"
        % kvmexit.LOST_REASONS[RARE_FULL]]
