#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Report time: from the end of tracing to the printed report.

    /usr/bin/python3 tests/bench/report_time.py      (as root, < 1 minute)

Part 1, real maps.  kvmexit's program is loaded (raw-old mode, SVM slot
layout) and filled through BPF_PROG_TEST_RUN by K live threads (K = 16,
64, 256, 1024), each exiting for a few reasons on every online CPU, so that
the per-CPU cache slots and the thread table both hold counts.  Then, on
the same maps:

  baseline  the per-(thread, reason, CPU) algorithm of bcc 0.26's report
            loop, written here against kvmexit's map layout: for each
            thread of the table (one lookup of its value on all CPUs), for
            each reason slot, for each CPU, one lookup of the cache map
            (which copies every CPU's cache slot) to see whether that CPU
            caches the thread, then the count from the cache or the table;
            a line for each non-zero sum.
  kvmexit   kvmexit.snapshot() + print_report(): every map read
            once, all CPUs at once -- the thread and rare hashes whole
            with BPF_MAP_LOOKUP_BATCH (Linux 5.6+; one lookup per key on
            older kernels), the cache and lost arrays by key -- and
            summed with numpy.

Both print to /dev/null; both outputs are checked against the counts the
threads produced.  Times are the best of a few runs.

Part 2, a model of a big host: 640 possible CPUs x 4096 traced threads,
in a child process.  Synthetic per-CPU buffers of the real byte size
(layout.words u64 per thread per CPU, SVM: 193 words = 1544 bytes, so
4096 x 640 x 1544 B = 3.8 GiB) are fed through kvmexit.snapshot() itself,
with kvmexit.read_percpu() replaced by a function that returns them, and
print_report() to /dev/null.  The time the kernel would take to
copy those bytes out is not in it: it is estimated apart, from the
copy-out rate of a 32 KiB-per-CPU map lookup measured here.
"""

import ctypes
import os
import resource
import struct
import sys
import time

import benchlib
from helpers import print_report  # noqa: E402
from benchlib import kvmexit

KS = (16, 64, 256, 1024)
# A handful of common SVM exit codes: IOIO, HLT, INTR, NPF, CPUID, MSR,
# READ_CR4, WRITE_CR4.
CODES = (0x7b, 0x78, 0x60, 0x400, 0x72, 0x7c, 0x04, 0x14)
REASONS_PER_CPU = 3
TARGET_RATIO = 50.0
MODEL_CPUS, MODEL_THREADS = 640, 4096
MODEL_TARGET_S = 2.0


def plan(i, cpus):
    """Thread i's exits: [(cpu, code, isa, times)]."""
    events = []
    for n, cpu in enumerate(cpus):
        for j in range(REASONS_PER_CPU):
            code = CODES[(i + 3 * n + j) % len(CODES)]
            events.append((cpu, code, kvmexit.ISA_SVM, 1 + (i + j) % 3))
    return events


def baseline_report(b, layout, ncpus, names, out):
    """The per-(thread, reason, CPU) algorithm, on kvmexit's maps.

    Returns the rows it printed, [(tgid, tid, code, count)]."""
    stats = b["pcpu_kvm_stat"]
    cache = b["pcpu_cache"]
    zero = cache.Key(0)
    rows = []
    print("PID      TID      %-35s %s" % ("KVM_EXIT_REASON", "COUNT"),
          file=out)
    for key in stats.keys():
        per_cpu = stats[key]            # this thread, every CPU
        pid_tgid = key.value
        isa = 0
        for slot in range(layout.slots):
            total = 0
            for cpu in range(ncpus):
                cached = cache[zero][cpu]   # the cache, every CPU, again
                if cached.pid_tgid == pid_tgid:
                    copy = cached.counts
                else:
                    copy = per_cpu[cpu]
                isa = isa or copy.isa
                total += copy.slot[slot]
            if total:
                code = layout.code(slot)
                print("%-8u %-8u %-35s %-8u"
                      % (pid_tgid >> 32, pid_tgid & 0xffffffff,
                         names.name(isa, code), total), file=out)
                rows.append((pid_tgid >> 32, pid_tgid & 0xffffffff, code,
                             total))
    out.flush()
    return rows


def kvmexit_report(b, layout, ncpus, names, selection, out):
    snap = kvmexit.snapshot(b, benchlib.program(layout), ncpus)
    print_report(selection, snap, names, out)
    return snap


def real_maps(bcc):
    layout = kvmexit.SVM_LAYOUT
    ncpus = benchlib.ncpus()
    cpus = benchlib.online_cpus()
    names = kvmexit.kernel_reason_names(kvmexit.tracepoint_dir())
    selection = kvmexit.Selection("all threads", "all")
    b, fd = benchlib.load_ours(bcc, max(kvmexit.MIN_MAX_THREADS, max(KS)),
                               layout)
    threads = benchlib.Threads()
    expected = {}
    rows = []
    read_rate = None
    devnull = open(os.devnull, "w")
    try:
        filled = 0
        for k in KS:
            pool = threads.grow(k)
            for i in range(filled, k):
                for cpu, code, isa, times in plan(i, cpus):
                    key = (os.getpid(), pool[i].tid, code)
                    expected[key] = expected.get(key, 0) + times
                benchlib.fire(pool[i], fd, plan(i, cpus))
            filled = k
            t_ours, snap = benchlib.best_of(5, lambda: kvmexit_report(
                b, layout, ncpus, names, selection, devnull))
            got = {(tg, tid, code): n
                   for (tg, tid, isa, code), n in snap.counts.items()}
            assert got == expected, "kvmexit's counts differ from the plan"
            assert not any(snap.lost), snap.lost
            t_base, base_rows = benchlib.best_of(3 if k <= 64 else 1, lambda:
                                        baseline_report(b, layout, ncpus,
                                                        names, devnull))
            assert {(tg, tid, c): n for tg, tid, c, n in base_rows} == \
                expected, "the baseline's counts differ from the plan"
            lookups = k + k * layout.slots * ncpus
            rows.append((k, len(expected), lookups, "%.1f" % (t_base * 1e3),
                         "%.2f" % (t_ours * 1e3),
                         "%.0fx" % (t_base / t_ours)))
            if k == max(KS):
                ratio = t_base / t_ours
                t_read, _ = benchlib.best_of(5, lambda: kvmexit.read_percpu(
                    b["pcpu_kvm_stat"], 8, layout.words, ncpus))
                read_rate = k * ncpus * layout.words * 8 / t_read
    finally:
        threads.stop()
        devnull.close()
        b.cleanup()
    print("Report time, real maps: %d possible CPUs, SVM layout (%d reason "
          "slots, %d B per thread per CPU), %d reasons per thread per CPU"
          % (ncpus, layout.slots, layout.words * 8, REASONS_PER_CPU))
    benchlib.table(("threads", "rows", "baseline lookups", "baseline ms",
                    "kvmexit ms", "speed-up"), rows)
    print("target: >= %.0fx at K = %d: %s (%.0fx)"
          % (TARGET_RATIO, max(KS), "met" if ratio >= TARGET_RATIO
             else "MISSED", ratio))
    print("kvmexit's read of the thread table at K = %d "
          "(kvmexit.read_percpu(), BPF_MAP_LOOKUP_BATCH): %s/s"
          % (max(KS), benchlib.human(read_rate)))
    return ratio >= TARGET_RATIO


#
# The 640-CPU model, in a child process so that its peak memory is its own.
#
def bpf(cmd, attr):
    return benchlib.bpfrun.bpf(cmd, attr, 128)[0]


def copy_out_rate():
    """Bytes per second the kernel copies out of a per-CPU map lookup with
    32 KiB per CPU (the largest per-CPU value), i.e. near memcpy speed."""
    ncpus = benchlib.ncpus()
    size = 32768
    fd = bpf(0, struct.pack("<IIIII", 6, 4, size, 1, 0))  # PERCPU_ARRAY
    try:
        key = ctypes.c_uint32(0)
        buf = ctypes.create_string_buffer(size * ncpus)
        attr = struct.pack("<I4xQQQ", fd, ctypes.addressof(key),
                           ctypes.addressof(buf), 0)
        n = 3000
        t = time.perf_counter()
        for _ in range(n):
            bpf(1, attr)                                  # LOOKUP_ELEM
        return n * size * ncpus / (time.perf_counter() - t)
    finally:
        os.close(fd)


def model(ncpus, nthreads):
    import numpy as np
    layout = kvmexit.SVM_LAYOUT
    words = layout.words
    t0 = time.perf_counter()
    keys, values = benchlib.model_table(ncpus, nthreads, layout)
    rng = np.random.default_rng(4)
    common = [benchlib.slot_of(layout, c)
              for c in (0x7b, 0x78, 0x60, 0x400, 0x72, 0x7c, 0x04, 0x14,
                        0x6e, 0x77, 0x79, 0x7d, 0x81, 0x8d, 0x61, 0x64)]
    per_thread = 8
    threads = np.arange(nthreads)
    all_cpus = np.arange(ncpus)
    total = 0
    for j in range(per_thread):
        slot = np.array([common[(t + j) % len(common)] for t in threads])
        counts = rng.integers(1, 1000, size=(nthreads, ncpus),
                              dtype=np.uint64)
        values[threads[:, None], all_cpus[None, :], 1 + slot[:, None]] = \
            counts
        total += int(counts.sum())
    # Each CPU caches one thread, with newer (larger) counts than its
    # table copy: +5 in each of that thread's slots on that CPU.
    cache = np.zeros((1, ncpus, 1 + words), dtype=np.uint64)
    for cpu in range(ncpus):
        t = (cpu * 7) % nthreads
        cache[0, cpu, 0] = keys[t]
        row = values[t, cpu].copy()
        row[1:][row[1:] != 0] += np.uint64(5)
        total += 5 * int((values[t, cpu, 1:] != 0).sum())
        cache[0, cpu, 1:] = row
    raw_keys = [k.to_bytes(8, "little") for k in keys]
    t_fill = time.perf_counter() - t0

    benchlib.model_maps(cache, raw_keys, values)
    names = kvmexit.ReasonNames()
    selection = kvmexit.Selection("all threads", "all")
    with open(os.devnull, "w") as devnull:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            snap = kvmexit.snapshot(benchlib.FakeMaps(),
                                    benchlib.program(layout), ncpus)
            print_report(selection, snap, names, devnull)
            times.append(time.perf_counter() - t)
    assert sum(snap.counts.values()) == total, "model: counts do not add up"
    assert len(snap.counts) == nthreads * per_thread
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"bytes": values.nbytes, "fill_s": t_fill, "best_s": min(times),
            "worst_s": max(times), "rows": len(snap.counts), "peak": peak}


def mem_available():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def modeled():
    layout = kvmexit.SVM_LAYOUT
    ncpus, nthreads = MODEL_CPUS, MODEL_THREADS
    size = ncpus * nthreads * layout.words * 8
    if mem_available() < size * 1.5:
        # Not enough room for the full model: keep 640 CPUs, fewer threads,
        # and say so; the time scales linearly with the bytes.
        nthreads = int(mem_available() / 1.5 / (ncpus * layout.words * 8))
        print("note: only %s available: modeling %d threads, not %d"
              % (benchlib.human(mem_available()), nthreads, MODEL_THREADS))
    r = benchlib.model_in_child(os.path.abspath(__file__), ncpus, nthreads)
    rate = copy_out_rate()
    print()
    print("Report time, modeled: %d possible CPUs x %d threads, SVM layout: "
          "%s of per-CPU thread counters (%d x %d x %d B)"
          % (ncpus, nthreads, benchlib.human(r["bytes"]), nthreads, ncpus,
             layout.words * 8))
    benchlib.table(
        ("step", "seconds"),
        [("build synthetic buffers (not part of the report)",
          "%.2f" % r["fill_s"]),
         ("snapshot() + print_report(), best of 3", "%.2f" % r["best_s"]),
         ("snapshot() + print_report(), worst of 3", "%.2f" % r["worst_s"]),
         ("kernel copy-out of those bytes at %s/s (estimate, apart)"
          % benchlib.human(rate), "%.2f" % (r["bytes"] / rate))])
    print("rows printed: %d; peak memory of the model process: %s"
          % (r["rows"], benchlib.human(r["peak"])))
    met = r["best_s"] < MODEL_TARGET_S
    print("target: aggregation + report < %.0f s: %s (%.2f s; with the "
          "estimated kernel copy-out %.2f s)"
          % (MODEL_TARGET_S, "met" if met else "MISSED", r["best_s"],
             r["best_s"] + r["bytes"] / rate))
    return met, r["best_s"]


def main():
    return benchlib.model_bench_main(__doc__, real_maps, modeled, model)


if __name__ == "__main__":
    sys.exit(main())
