#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Per-event cost in the kernel: kvmexit's program against bcc 0.26's.

    /usr/bin/python3 tests/bench/event_cost.py [--runs 5] [--rounds 200]
        [--baseline-ref REF ...]      (as root, ~15 s a run, more with refs)

With kernel.bpf_stats_enabled=1 (restored afterwards) the kernel adds up,
per program, the time spent running it (run_time_ns) and the runs
(run_cnt); read through BPF_OBJ_GET_INFO_BY_FD (tests/bpfrun.run_stats,
checked here against `bpftool prog show`).  Programs run through
BPF_PROG_TEST_RUN from threads pinned to one CPU, in the raw-old mode
(ctx->args = exit_reason, vcpu, isa); exit code 30 (VMX IO_INSTRUCTION,
below bcc 0.26's REASON_NUM, a direct slot in kvmexit).

Paths:
  hit        one thread exits again and again on one CPU: the CPU's cache
             slot holds it.
  eviction   two threads take turns on one CPU: every exit writes the
             other thread's counters back to the table and loads its own.
  filtered   the thread is not one asked for (-p 1 here): the program
             returns at once.

Programs, all loaded in the same run:
  empty      int fn(ctx) { return 0; } -- what running any program costs
             with this accounting; subtracted from the others.
  kvmexit    bpf/kvmexit.bpf.c, raw-old, SVM layout, all threads (and a
             second load with -p 1 for the filtered path), with the table
             growth kvmexit always compiles in (benchlib.DEFAULT_FEATURES).
  kvmexit REF   with --baseline-ref REF (repeatable): the same, as kvmexit.py
             and bpf/ are at git REF (e.g. 5ea84f6, before the table grew:
             issue 16's "the per-event cost must not grow").
  bcc 0.26   the program text of /usr/sbin/kvmexit-bpfcc (Debian's bcc
             0.26 kvmexit), read at run time, as its raw tracepoint
             variant (exit reason in args[0]), THREAD_FILTER 0 (and
             'tgid != 1' for the filtered path).

Each round measures, per path and one right after the other, the empty
program, then kvmexit's, bcc 0.26's and each REF's (each in turn first),
so that other work on the machine (an interrupt or a host preemption
during a run counts in run_time_ns) hits them alike; the order of the
paths rotates.
A run is ROUNDS such rounds; each run's table shows medians over its
rounds of ns per event minus that round's empty program, and of the
rounds' kvmexit/bcc (and kvmexit/REF) ratios.  After --runs runs (each
loading the programs anew, so that their maps sit elsewhere in memory) a
last table gives, per path and compared program, each run's median ratio,
their median and their spread (lowest to highest run); the targets
(kvmexit <= 1.0x bcc 0.26, and <= 1.0x each REF, on every path) are
judged on the median over the runs.
"""

import argparse
import ctypes
import json
import os
import statistics
import struct
import subprocess
import sys

import benchlib
from benchlib import bpfrun, kvmexit

ROUNDS = 200
EVENTS = 1000               # per round, hit and filtered paths
SWITCHES = 100              # per round, eviction path (per thread)
CODE = 30
CPU = 0                     # set in main(): the first online CPU
TARGET = 1.0
PATHS = ("hit", "eviction", "filtered")
BCC = "bcc 0.26"


def prog_id(fd):
    buf = ctypes.create_string_buffer(256)
    attr = struct.pack("<IIQ", fd, len(buf), ctypes.addressof(buf))
    bpfrun.bpf(bpfrun.BPF_OBJ_GET_INFO_BY_FD, attr)
    return struct.unpack_from("<I", buf.raw, 4)[0]


def check_run_stats(fd):
    """bpfrun.run_stats() against bpftool's view of the same program."""
    out = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id(fd)),
                          "--json"], stdout=subprocess.PIPE, text=True,
                         check=True).stdout
    shown = json.loads(out)
    ours = bpfrun.run_stats(fd)
    return (shown.get("run_time_ns"), shown.get("run_cnt")), ours


def hits(fd, isa, n):
    def job():
        os.sched_setaffinity(0, {CPU})
        for _ in range(n):
            bpfrun.test_run(fd, [CODE, 0, isa])
    return job


def per_event(fd, run, warm=None):
    if warm:
        warm()                  # e.g. bring the thread into the cache slot
    t0, c0 = bpfrun.run_stats(fd)
    run()
    t1, c1 = bpfrun.run_stats(fd)
    return (t1 - t0) / (c1 - c0)


def load_programs(bcc, refs):
    """Every program of a run, loaded anew: {path's program set: ...} as
    (BPF objects, {name: (fd for hit and eviction, fd for filtered)})."""
    not_asked = kvmexit.Selection("PID 1", "pid", tgid=1)
    m = kvmexit.MIN_MAX_THREADS
    loaded, fds = [], {}

    def add(name, pair):
        (b, fd), (b_f, fd_f) = pair
        loaded.extend((b, b_f))
        fds[name] = (fd, fd_f)

    add("kvmexit", (benchlib.load_ours(bcc, m,
                                       features=benchlib.DEFAULT_FEATURES),
                    benchlib.load_ours(bcc, m, selection=not_asked,
                                       features=benchlib.DEFAULT_FEATURES)))
    bcc_b, bcc026, reasons = benchlib.load_bcc026(bcc)
    bcc_f_b, bcc026_f, _ = benchlib.load_bcc026(bcc, "tgid != 1")
    assert CODE < reasons
    add(BCC, ((bcc_b, bcc026), (bcc_f_b, bcc026_f)))
    for ref, module in refs:
        add("kvmexit " + ref, (benchlib.load_ours_at(module, bcc, m),
                               benchlib.load_ours_at(module, bcc, m,
                                                     tgid=1)))
    return loaded, fds


def one_run(bcc, refs):
    """One run: every program loaded anew, ROUNDS rounds; its table
    printed; {(path, compared program): median of the rounds' kvmexit /
    compared ratios}."""
    isa = kvmexit.ISA_SVM
    empty_b, empty = benchlib.load_empty(bcc)
    loaded, fds = load_programs(bcc, refs)
    loaded.append(empty_b)
    names = list(fds)

    a, b = bpfrun.PinnedThread(), bpfrun.PinnedThread()

    def evictions(fd):
        def run():
            for _ in range(SWITCHES):
                a.call(hits(fd, isa, 1))
                b.call(hits(fd, isa, 1))
        return run

    def repeat(fd):
        return lambda: a.call(hits(fd, isa, EVENTS))

    def once(fd):
        return lambda: a.call(hits(fd, isa, 1))

    # path: (which fd of each program, run, warm-up outside the measured
    # window)
    paths = [("hit", 0, repeat, once),
             ("eviction", 0, evictions, None),
             ("filtered", 1, repeat, once)]
    # Per path, per round: {program: ns per event}, measured one right
    # after the other.
    samples = {path: [] for path, *_ in paths}
    try:
        with benchlib.BpfStats():
            for n in range(ROUNDS):
                turn = n % len(paths)
                for path, which, run, warm in paths[turn:] + paths[:turn]:
                    # The programs in turn first, so that none is always
                    # measured right after another.
                    k = n % len(names)
                    order = [("empty", empty, repeat, once)] + [
                        (name, fds[name][which], run, warm)
                        for name in names[k:] + names[:k]]
                    samples[path].append(
                        {name: per_event(fd, how(fd), first and first(fd))
                         for name, fd, how, first in order})
            shown, read = check_run_stats(empty)
            shown2, read2 = check_run_stats(fds["kvmexit"][0])
    finally:
        a.stop()
        b.stop()
        for obj in loaded:
            obj.cleanup()
    with open(benchlib.BpfStats.PATH) as f:
        restored = f.read().strip()
    ratios = run_table(samples, names)
    print("bpfrun.run_stats vs bpftool prog show: (run_time_ns, run_cnt) "
          "%s vs %s, %s vs %s: %s" % (
              read, shown, read2, shown2,
              "same" if (read, read2) == (shown, shown2) else "DIFFERENT"))
    print("kernel.bpf_stats_enabled restored to %s" % restored)
    print()
    return ratios, (read, read2) == (shown, shown2)


def quartiles(xs):
    xs = sorted(xs)
    return xs[len(xs) // 4], statistics.median(xs), xs[3 * len(xs) // 4]


def run_table(samples, names):
    """One run's table: per path, each program's median ns per event less
    the empty program's, and kvmexit's ratio to each other program (the
    median of the rounds' ratios, and their middle half).  Returns
    {(path, other program): median ratio}."""
    empties = [got["empty"] for path in samples for got in samples[path]]
    others = names[1:]
    rows = [["empty", "%.1f" % statistics.median(empties)] +
            [""] * (len(names) - 1 + 2 * len(others))]
    ratios = {}
    for path in PATHS:
        ns = {name: [got[name] - got["empty"] for got in samples[path]]
              for name in names}
        row = [path] + ["%.1f" % statistics.median(ns[name])
                        for name in names]
        for other in others:
            r = quartiles([k / c for k, c in zip(ns["kvmexit"], ns[other])
                           if c > 0])
            ratios[(path, other)] = r[1]
            row += ["%.2f" % r[1], "%.2f..%.2f" % (r[0], r[2])]
        rows.append(row)
    print("Per-event cost in the kernel, ns per event minus the empty "
          "program's (measured right before, each round); CPU %d, %d "
          "rounds x %d events (%d thread switches for eviction); medians"
          % (CPU, ROUNDS, EVENTS, SWITCHES))
    headers = ["path"] + names
    for other in others:
        headers += ["kvmexit/" + other.replace("kvmexit ", ""),
                    "middle half"]
    benchlib.table(headers, rows)
    print("(empty: the empty program's own ns per event, i.e. what running "
          "any program costs with this accounting)")
    return ratios


def runs_table(runs, others):
    """Per path and compared program: each run's median ratio, the median
    over the runs and their spread; whether every target was met: at most
    TARGET times bcc 0.26's, and (issue 16) no more than at each ref."""
    rows, met, verdicts = [], True, []
    for other in others:
        for path in PATHS:
            ratios = [r[(path, other)] for r in runs]
            median = statistics.median(ratios)
            rows.append(["%s/%s" % (path, other.replace("kvmexit ", ""))] +
                        ["%.2f" % r for r in ratios] +
                        ["%.2f" % median,
                         "%.2f..%.2f" % (min(ratios), max(ratios))])
            ok = median <= TARGET
            met = met and ok
            verdicts.append(
                "target: %s <= %.1fx %s: %s (%.2fx, median of the runs)"
                % (path, TARGET, other, "met" if ok else "MISSED", median))
    print("kvmexit's cost / the other program's, per run (each the median "
          "of its %d rounds' ratios), runs alternating on CPU %d"
          % (ROUNDS, CPU))
    benchlib.table(["path/program"] +
                   ["run %d" % (n + 1) for n in range(len(runs))] +
                   ["median", "spread"], rows)
    for line in verdicts:
        print(line)
    return met


def main():
    global CPU, ROUNDS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline-ref", action="append", default=[],
                   metavar="REF", help="also kvmexit's program as it is "
                   "at git REF (repeatable)")
    args, bcc, CPU = benchlib.cost_bench_start(p, ROUNDS)
    ROUNDS = args.rounds
    refs = [(ref, benchlib.kvmexit_at(ref)) for ref in args.baseline_ref]
    runs, same = [], True
    for _ in range(args.runs):
        ratios, stats_same = one_run(bcc, refs)
        runs.append(ratios)
        same = same and stats_same
    met = runs_table(runs, [BCC] + ["kvmexit " + ref for ref, _ in refs])
    return 0 if met and same else 1


if __name__ == "__main__":
    sys.exit(main())
