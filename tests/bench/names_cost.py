#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""What the kernel's VM names cost per event: the program as the tool
loads it (growth, VM names) against the same without VM names.

    /usr/bin/python3 tests/bench/names_cost.py [--runs 5] [--rounds 20]
    (as root, ~10 s a run)

VM names add code to one path only: a thread's first exit since tracing
began, when it enters the thread table (take_vm_name(): the leader's start
time, a lookup, and for a process not named yet its comm and the first
bytes of its command line).  Paths, run through BPF_PROG_TEST_RUN on the
first online CPU, in the raw-old mode, with kernel.bpf_stats_enabled=1
(restored afterwards):
  hit        one thread exits again and again on one CPU
  new        a new thread's first exit (THREADS new threads of this
             process a round, each ending after its exit; this process is
             named at the first of them only, as a VM is, so most of them
             pay the lookup that finds the name)
  new VM     the first exit of a new process's thread: the whole read
             (one child process a round)
Each round measures both programs one right after the other; a run's
table shows medians over its rounds of ns per event minus the empty
program's; the last table each run's median extra ns of VM names per
path, their median and spread (lowest to highest run).
"""

import argparse
import os
import statistics
import subprocess
import sys

import benchlib
from benchlib import bpfrun, kvmexit

ROUNDS = 20
HITS = 1000
THREADS = 50
CODE = 0x7b                 # SVM IOIO: a direct slot
# A VM's first exit from a child process, told its program's fd.
CHILD = ("import os, sys\n"
         "sys.path.insert(0, %r)\n"
         "from helpers import bpfrun\n"
         "os.sched_setaffinity(0, {int(sys.argv[2])})\n"
         "bpfrun.test_run(int(sys.argv[1]), [%d, 0, 2])\n"
         % (benchlib.TESTS, CODE))


def load(bcc, features):
    b = kvmexit.load_program(benchlib.program(
        kvmexit.SVM_LAYOUT, features=frozenset(features)))
    return b, b.load_func(b"raw_kvm_exit", bcc.BPF.RAW_TRACEPOINT).fd


def hits(fd, cpu):
    def run():
        def body(tid):
            for _ in range(HITS):
                bpfrun.test_run(fd, [CODE, 0, kvmexit.ISA_SVM])
        bpfrun.in_thread(cpu, body)
    return run


def new_threads(fd, cpu):
    def run():
        for _ in range(THREADS):
            bpfrun.in_thread(cpu, lambda tid: bpfrun.test_run(
                fd, [CODE, 0, kvmexit.ISA_SVM]))
    return run


def new_vm(fd, cpu):
    def run():
        subprocess.run([sys.executable, "-c", CHILD, str(fd), str(cpu)],
                       pass_fds=[fd], check=True)
    return run


PATHS = (("hit", hits), ("new", new_threads), ("new VM", new_vm))


def per_event(fd, run):
    t0, c0 = bpfrun.run_stats(fd)
    run()
    t1, c1 = bpfrun.run_stats(fd)
    return (t1 - t0) / (c1 - c0)


def one_run(bcc, cpu, rounds):
    """{path: [(ns without names, ns with names) per round]}."""
    empty_b, empty = benchlib.load_empty(bcc)
    programs = [load(bcc, {"growth"}), load(bcc, {"growth", "names"})]
    tables = [kvmexit.ThreadTables(b, benchlib.program(
        kvmexit.SVM_LAYOUT, features=frozenset(f)), benchlib.ncpus())
        for (b, _), f in zip(programs, ({"growth"}, {"growth", "names"}))]
    ledgers = [kvmexit.Ledger(), kvmexit.Ledger()]
    found = {name: [] for name, _ in PATHS}
    try:
        for r in range(rounds):
            for name, path in PATHS:
                base = per_event(empty, hits(empty, cpu)) if name == "hit" \
                    else 0.0
                order = programs if r % 2 == 0 else programs[::-1]
                ns = {fd: per_event(fd, path(fd, cpu)) - base
                      for _, fd in order}
                found[name].append(tuple(ns[fd] for _, fd in programs))
            # Retire the ended threads, as the tool does every second.
            for ledger, t in zip(ledgers, tables):
                ledger.read(t, take=True)
    finally:
        for b, _ in programs:
            b.cleanup()
        empty_b.cleanup()
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args, bcc, cpu = benchlib.cost_bench_start(p, ROUNDS)
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        stats = f.read().strip()
    with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
        f.write("1")
    extra = {name: [] for name, _ in PATHS}
    try:
        for run in range(args.runs):
            found = one_run(bcc, cpu, args.rounds)
            rows = []
            for name, _ in PATHS:
                without = statistics.median(a for a, _ in found[name])
                with_names = statistics.median(b for _, b in found[name])
                extra[name].append(with_names - without)
                rows.append((name, "%.0f" % without, "%.0f" % with_names,
                             "%+.0f" % (with_names - without)))
            print("Run %d: ns per event (medians of %d rounds; hit less "
                  "the empty program)" % (run + 1, args.rounds))
            benchlib.table(("path", "growth", "growth, VM names", "extra"),
                           rows)
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(stats)
    print("VM names: extra ns per event, each run's median")
    benchlib.table(("path", "runs", "median", "spread"), [
        (name, " ".join("%+.0f" % x for x in xs),
         "%+.0f" % statistics.median(xs),
         "%+.0f to %+.0f" % (min(xs), max(xs)))
        for name, xs in extra.items()])
    return 0


if __name__ == "__main__":
    os.chdir(benchlib.ROOT)
    sys.exit(main())
