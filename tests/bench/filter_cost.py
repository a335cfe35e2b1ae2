#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Cost of the -T filter per event, for lists of 1 to 12,500 TIDs: a chain
of comparisons compiled into the program (kvmexit up to
Selection.CHAIN_MAX_TIDS, and bcc 0.26's kvmexit) against the TID bitmap
kvmexit uses for longer lists.

    /usr/bin/python3 tests/bench/filter_cost.py      (as root, ~1 min)

Measured as tests/bench/event_cost.py does (kernel.bpf_stats_enabled,
BPF_PROG_TEST_RUN from a thread pinned to one CPU, minus an empty
program's cost in the same round), on two paths:
  filtered   the exiting thread is not in the list: the program returns
             at once.  This is the path every other thread of the host
             takes.
  listed     the thread is in the list: filter, then the cache-slot hit.
The chain is bcc 0.26's program text with its THREAD_FILTER set to
"pid != T1 && pid != T2 ...", as kvmexit's FILTER_OUT macro was.  Clang
crashed on 12,500 of them (issue 10), so the chain stops at 5,000.
"""

import os
import statistics
import sys

import benchlib
from benchlib import bpfrun, kvmexit

ROUNDS = 40
EVENTS = 1000
CODE = 30
SIZES = (1, 100, 1000, 5000, 12500)
CHAIN_MAX = 5000


class Bitmap(kvmexit.Selection):
    """TIDs in the bitmap whatever their number."""

    def __init__(self, tids):
        super().__init__("TIDS", "tids", tids=tids)

    def kernel_filter(self):
        return ["-DFILTER_TIDS"]


def main():
    benchlib.need_root()
    bcc = benchlib.import_bcc()
    cpu = benchlib.online_cpus()[0]
    isa = kvmexit.ISA_SVM
    me = bpfrun.PinnedThread()
    # TIDs that are not this thread's, below pid_max; `listed` adds it.
    others = [t for t in range(2, kvmexit.pid_max()) if t != me.tid]

    def run(fd, n=EVENTS):
        def job():
            os.sched_setaffinity(0, {cpu})
            for _ in range(n):
                bpfrun.test_run(fd, [CODE, 0, isa])
        return lambda: me.call(job)

    def per_event(fd):
        run(fd, 1)()            # warm: the thread into the cache slot
        t0, c0 = bpfrun.run_stats(fd)
        run(fd)()
        t1, c1 = bpfrun.run_stats(fd)
        return (t1 - t0) / (c1 - c0)

    loaded, progs = [], []
    empty_b, empty = benchlib.load_empty(bcc)
    loaded.append(empty_b)
    try:
        for size in SIZES:
            for path in ("filtered", "listed"):
                tids = others[:size] if path == "filtered" else \
                    others[:size - 1] + [me.tid]
                b, fd = benchlib.load_ours(bcc, kvmexit.MIN_MAX_THREADS,
                                           selection=Bitmap(tids))
                loaded.append(b)
                chain = None
                if size <= CHAIN_MAX:
                    cb, chain, _ = benchlib.load_bcc026(
                        bcc, " && ".join("pid != %d" % t for t in tids))
                    loaded.append(cb)
                progs.append((size, path, fd, chain))
        samples = {(s, p): [] for s, p, _, _ in progs}
        with benchlib.BpfStats():
            for n in range(ROUNDS):
                for size, path, fd, chain in progs:
                    base = per_event(empty)
                    pair = [("bitmap", fd), ("chain", chain)]
                    if n % 2:
                        pair.reverse()
                    got = {name: per_event(f) - base if f else None
                           for name, f in pair}
                    samples[(size, path)].append((got["bitmap"],
                                                  got["chain"]))
    finally:
        me.stop()
        for b in loaded:
            b.cleanup()

    rows = []
    for size, path, _, chain in progs:
        got = samples[(size, path)]
        bitmap = statistics.median(g for g, _ in got)
        if chain:
            chained = statistics.median(c for _, c in got)
            ratio = statistics.median(g / c for g, c in got if c > 0)
            rows.append((size, path, "%.1f" % bitmap, "%.1f" % chained,
                         "%.2f" % ratio))
        else:
            rows.append((size, path, "%.1f" % bitmap, "-", "-"))
    print("-T filter, ns per event minus the empty program's; CPU %d, %d "
          "rounds x %d events; medians" % (cpu, ROUNDS, EVENTS))
    benchlib.table(("TIDs", "path", "bitmap", "chain (bcc 0.26)",
                    "bitmap/chain"), rows)
    print("kvmexit compiles lists of up to %d TIDs as a chain, and puts "
          "longer ones in the bitmap" % kvmexit.Selection.CHAIN_MAX_TIDS)
    print("chain of %d TIDs: not built (clang crashed on 12,500)"
          % SIZES[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
