"""A thread table that grows while tracing: 10,000 live threads through a
table that starts at 1,024, every exit counted once.

kvmexit's program (raw-old mode, SVM layout, -DGROWTH) runs through
BPF_PROG_TEST_RUN from live threads of this process pinned to CPUs 0 and
1 (tests/helpers/bpfrun.py).  ThreadTables keeps a free generation twice the
newest's size; between batches, ThreadTables.grow() runs as the tool runs
it every second and adds the next once a thread has entered the free one.
Runs as root on the real kernel."""

import os

import kvmexit

SVM = kvmexit.ISA_SVM
PID = os.getpid()
IOIO, HLT, INTR = 0x7b, 0x78, 0x60
THREADS, BATCH, START = 10_000, 250, 1_024


def program(max_threads):
    return kvmexit.Program(kvmexit.Probe("raw-old", "test"),
                           kvmexit.Selection("all threads", "all"),
                           max_threads, kvmexit.SVM_LAYOUT,
                           frozenset({"growth"}))


def load(bcc, max_threads, meminfo="/proc/meminfo"):
    b = kvmexit.load_program(program(max_threads))
    b.fd = b.load_func(b"raw_kvm_exit", bcc.BPF.RAW_TRACEPOINT).fd
    return b, kvmexit.ThreadTables(b, program(max_threads),
                                   kvmexit.possible_cpus(), meminfo)


def mine(counts):
    return {k: v for k, v in counts.items() if k[0] == PID}


def test_10000_live_threads_through_a_table_that_starts_at_1024(
        bcc, cpus_0_1, threads):
    b, tables = load(bcc, START)
    try:
        ledger = kvmexit.Ledger()
        live = threads(THREADS)
        expected = {}
        sizes = []
        for first in range(0, THREADS, BATCH):
            for i in range(first, first + BATCH):
                t, cpu = live[i], i % 2
                t.exits(b.fd, cpu, IOIO, SVM, times=1 + i % 3)
                t.exits(b.fd, 1 - cpu, HLT, SVM)
                expected[(PID, t.tid, SVM, IOIO)] = 1 + i % 3
                expected[(PID, t.tid, SVM, HLT)] = 1
            ledger.retire(tables)
            grown = tables.grow()
            if grown:
                sizes.append(grown)
        # Threads of every generation exit again: each finds its entry
        # in the generation it entered.
        for i in range(0, THREADS, 7):
            live[i].exits(b.fd, (i // 7) % 2, INTR, SVM, times=2)
            expected[(PID, live[i].tid, SVM, INTR)] = 2
        snap = ledger.read(tables)
        assert snap.lost == [0] * len(kvmexit.LOST)
        assert mine(snap.counts) == expected
        # 1,024, the free 2,048 from the start, then one more each time
        # a thread entered the free one.
        assert sizes == [4096, 8192, 16384]
        assert tables.capacity() == 1024 + 2048 + 4096 + 8192 + 16384
        keys = tables.keys(kvmexit.THREAD_MAP)
        assert len(keys) == len(set(keys)) >= THREADS
        assert tables.at_limit is None
    finally:
        b.cleanup()


def test_a_burst_within_a_tick_enters_the_free_generation(
        bcc, cpus_0_1, threads):
    # 40 new threads before any tick: 16 in the first table, 24 in the
    # free one of 32.
    b, tables = load(bcc, 16)
    try:
        expected = {}
        for n, t in enumerate(threads(40)):
            t.exits(b.fd, n % 2, IOIO, SVM, times=1 + n % 5)
            expected[(PID, t.tid, SVM, IOIO)] = 1 + n % 5
        snap = kvmexit.Ledger().read(tables)
        assert snap.lost == [0] * len(kvmexit.LOST)
        assert mine(snap.counts) == expected
        assert [len(kvmexit.map_keys(t.map_fd, 8))
                for t in tables.generations] == [16, 24]
        assert tables.grow() == 64
    finally:
        b.cleanup()


def test_growth_stops_at_the_memory_check_with_a_warning(
        bcc, cpus_0_1, threads, tmp_path, capfd):
    # MemAvailable so small that no bigger table passes the check: the
    # free generation is refused as the tables load.
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1000000 kB\nMemAvailable: 100 kB\n")
    b, tables = load(bcc, 16, str(meminfo))
    try:
        # 32 threads x 2 CPUs x 1544 B and the entries: over 50 kB.
        assert tables.at_limit.startswith("a table of 32 more would take ")
        err = capfd.readouterr().err
        assert err.startswith("kvmexit: warning: the thread table cannot "
                              "grow beyond 16 threads: a table of 32 more")
        assert err.count("\n") == 1
        for t in threads(13):
            t.exits(b.fd, 0, IOIO, SVM)
        assert tables.grow() is None            # said once
        assert capfd.readouterr().err == ""
        fill = dict((name, (n, cap)) for name, n, cap in
                    kvmexit.BpfSelf(b, tables).table_fill())
        assert fill["pcpu_kvm_stat"] == (13, 16)
    finally:
        b.cleanup()


def test_the_fill_counts_every_generation(bcc, cpus_0_1, threads):
    b, tables = load(bcc, 16)
    try:
        for t in threads(12):
            t.exits(b.fd, 1, IOIO, SVM)
        assert tables.grow() is None            # the free one is empty
        for t in threads(8):
            t.exits(b.fd, 0, HLT, SVM)
        fill = dict((name, (n, cap)) for name, n, cap in
                    kvmexit.BpfSelf(b, tables).table_fill())
        assert fill["pcpu_kvm_stat"] == (20, 48)
        assert len(kvmexit.map_keys(tables.generations[1].map_fd, 8)) == 4
        assert tables.grow() == 64
        fill = dict((name, (n, cap)) for name, n, cap in
                    kvmexit.BpfSelf(b, tables).table_fill())
        assert fill["pcpu_kvm_stat"] == (20, 112)
    finally:
        b.cleanup()
