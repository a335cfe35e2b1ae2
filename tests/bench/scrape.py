#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Scrape time and memory of `kvmexit --prometheus`.

    /usr/bin/python3 tests/bench/scrape.py      (as root, ~1 minute)

Part 1, real maps.  kvmexit's program is loaded (raw-old mode, SVM slot
layout, a thread table of 4,160) and filled through BPF_PROG_TEST_RUN by K
live threads (K = 256, 1024, 4096), each exiting for 20 reasons spread over
the online CPUs.  Then, on the same maps, best of 5:
  report    the baseline, measured in the same run: kvmexit's own text
            report (kvmexit.snapshot() + TextReport to /dev/null);
  scrape    what one /metrics request costs the exporter: retire (list the
            thread table, check /proc), read every map, sum per VM, vCPU
            and reason, write the text (kvmexit.exposition(): the series
            by kvmexit, the small families by prometheus_client), through
            kvmexit.Exporter;
  http      the same, fetched over loopback from kvmexit.MetricsServer;
  tick      the once-a-second retirement alone (no thread has ended).
Every scrape's kvm_exits_total samples are checked to add up to the exits
fired.  Memory: this process's resident set after the first scrape and
after 20 more (it must stay flat).

Part 2, a model of a big host: 640 possible CPUs x 4096 threads x 20
reasons, in a child process.  Synthetic per-CPU buffers of the real byte
size (4096 x 640 x 1544 B = 3.8 GiB) are fed through the exporter itself,
with kvmexit.read_percpu() replaced by a function that returns them (as
tests/bench/report_time.py does).  The kernel's copy-out of those bytes is
estimated apart, from the measured copy-out rate.  Target (issue 18): a
scrape within 0.5 s there, with the default labels, in every run
(--model-runs 5 --no-real runs the model alone 5 times, each in a new
process, and gives the spread).  Before and after, alternating in each
run: the same scrape written wholly by prometheus_client's generate_latest
(as before kvmexit wrote its series itself), then by kvmexit.exposition().
"""

import os
import resource
import sys
import time
import urllib.request

import benchlib
from benchlib import kvmexit

KS = (256, 1024, 4096)
REASONS = 20
# SVM codes with a direct slot (and NPF, a high slot): 20 of them.
CODES = (0x7b, 0x78, 0x60, 0x400, 0x72, 0x7c, 0x04, 0x14, 0x6e, 0x77,
         0x79, 0x7d, 0x81, 0x8d, 0x61, 0x64, 0x00, 0x10, 0x03, 0x13)
MODEL_CPUS, MODEL_THREADS = 640, 4096
TARGET_S = 0.5
SCRAPES = 5


def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def plan(i, cpus):
    return [(cpus[(i + j) % len(cpus)], code, kvmexit.ISA_SVM,
             1 + (i + j) % 3) for j, code in enumerate(CODES)]


def with_vcpu_ids(snap):
    """Each thread its own vCPU id, as the raw-new probe reads them from
    struct kvm_vcpu on a real host (the raw-old program test-run here sees
    none): one series per thread and reason, not one per reason."""
    for n, thread in enumerate(sorted(snap.vcpu_ids)):
        snap.vcpu_ids[thread] = n
    return snap


def exporter_of(tables, ledger, selection, names):
    from prometheus_client import CollectorRegistry
    exporter = kvmexit.Exporter(lambda: with_vcpu_ids(ledger.read(tables)),
                                names, selection, kvmexit.VmNames(), False,
                                {"version": kvmexit.VERSION})
    registry = CollectorRegistry()
    registry.register(exporter)
    return exporter, registry


def exits_in(text):
    from prometheus_client.parser import text_string_to_metric_families
    return sum(s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "kvm_exits_total")


def real_maps(bcc):
    layout = kvmexit.SVM_LAYOUT
    ncpus, cpus = benchlib.ncpus(), benchlib.online_cpus()
    names = kvmexit.kernel_reason_names(kvmexit.tracepoint_dir())
    selection = kvmexit.Selection("all threads", "all")
    b, fd = benchlib.load_ours(bcc, max(KS) + 64, layout)
    tables = kvmexit.ThreadTables(
        b, benchlib.program(layout, max(KS) + 64), ncpus)
    ledger = kvmexit.Ledger()
    exporter, registry = exporter_of(tables, ledger, selection, names)
    server = kvmexit.listen(("127.0.0.1", 0))
    server.registry.register(exporter)
    server.start()
    port = server.httpd.server_address[1]
    threads = benchlib.Threads()
    rows, total, filled, ok = [], 0, 0, True
    devnull = open(os.devnull, "w")
    try:
        for k in KS:
            pool = threads.grow(k)
            for i in range(filled, k):
                events = plan(i, cpus)
                total += sum(e[3] for e in events)
                benchlib.fire(pool[i], fd, events)
            filled = k
            report = kvmexit.TextReport(selection, names, out=devnull)
            t_report, _ = benchlib.best_of(SCRAPES, lambda: report.report(
                tables.snapshot(), None, time.time()))
            t_scrape, text = benchlib.best_of(
                SCRAPES, lambda: kvmexit.exposition(registry).decode())
            assert exits_in(text) == total, "the scrape lost exits"
            url = "http://127.0.0.1:%d/metrics" % port
            t_http, body = benchlib.best_of(SCRAPES, lambda: urllib.request.urlopen(
                url, timeout=60).read().decode())
            assert exits_in(body) == total
            t_tick, _ = benchlib.best_of(SCRAPES, lambda: ledger.retire(tables))
            before = rss()
            for _ in range(20):
                kvmexit.exposition(registry)
            after = rss()
            assert text.count("\nkvm_exits_total{") == k * REASONS
            rows.append((k, k * REASONS, benchlib.human(len(text)),
                         "%.1f" % (t_report * 1e3), "%.1f" % (t_scrape * 1e3),
                         "%.1f" % (t_http * 1e3), "%.2f" % (t_scrape /
                                                          t_report),
                         "%.1f" % (t_tick * 1e3), benchlib.human(before),
                         benchlib.human(after)))
            ok = ok and after <= before * 1.05
    finally:
        server.stop()
        threads.stop()
        devnull.close()
        b.cleanup()
    print("Scrape time, real maps: %d possible CPUs, SVM layout, %d reasons "
          "per thread, best of %d" % (ncpus, REASONS, SCRAPES))
    benchlib.table(("threads", "series", "text", "report ms", "scrape ms",
                    "http ms", "scrape/report", "tick ms", "RSS 1st",
                    "RSS +20"), rows)
    print("memory flat over 20 scrapes (within 5%%): %s"
          % ("yes" if ok else "NO"))
    return ok


#
# The 640-CPU model, in a child process so that its peak memory is its own.
#
class ModelTables(kvmexit.ThreadTables):
    """The model's tables: no thread has ended, so retirement finds
    nothing to take (its own cost is part 1's tick)."""

    def keys(self, spec):
        return []


def model(ncpus, nthreads):
    import numpy as np
    from prometheus_client import generate_latest
    layout = kvmexit.SVM_LAYOUT
    words = layout.words
    t0 = time.perf_counter()
    keys, values = benchlib.model_table(ncpus, nthreads, layout)
    rng = np.random.default_rng(4)
    for slot in (benchlib.slot_of(layout, c) for c in CODES):
        values[:, :, 1 + slot] = rng.integers(1, 1000,
                                              size=(nthreads, ncpus),
                                              dtype=np.uint64)
    total = int(values[:, :, 1:].sum())
    cache = np.zeros((1, ncpus, 1 + words), dtype=np.uint64)
    raw_keys = [k.to_bytes(8, "little") for k in keys]
    t_fill = time.perf_counter() - t0

    benchlib.model_maps(cache, raw_keys, values)
    tables = ModelTables(benchlib.FakeMaps(), benchlib.program(layout),
                         ncpus)
    _, registry = exporter_of(tables, kvmexit.Ledger(proc="/nonexistent"),
                              kvmexit.Selection("all threads", "all"),
                              kvmexit.ReasonNames())
    selection = kvmexit.Selection("all threads", "all")
    names = kvmexit.ReasonNames()
    times, before_times, report_times = [], [], []
    with open(os.devnull, "w") as devnull:
        for _ in range(3):
            t = time.perf_counter()
            kvmexit.TextReport(selection, names, out=devnull).report(
                tables.snapshot(), None, 0)
            report_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            theirs = generate_latest(registry)
            before_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            text = kvmexit.exposition(registry)
            times.append(time.perf_counter() - t)
    assert exits_in(text.decode()) == total, "model: exits do not add up"
    assert exits_in(theirs.decode()) == total
    assert text.count(b"\nkvm_exits_total{") == nthreads * REASONS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"bytes": values.nbytes, "fill_s": t_fill, "best_s": min(times),
            "worst_s": max(times), "text": len(text), "peak": peak,
            "before_s": min(before_times), "before_worst_s": max(before_times),
            "series": nthreads * REASONS, "report_s": min(report_times)}


def modeled():
    import report_time
    layout = kvmexit.SVM_LAYOUT
    r = benchlib.model_in_child(os.path.abspath(__file__), MODEL_CPUS,
                                MODEL_THREADS)
    rate = report_time.copy_out_rate()
    print()
    print("Scrape time, modeled: %d possible CPUs x %d threads x %d reasons, "
          "SVM layout: %s of per-CPU thread counters (%d x %d x %d B)"
          % (MODEL_CPUS, MODEL_THREADS, REASONS, benchlib.human(r["bytes"]),
             MODEL_THREADS, MODEL_CPUS, layout.words * 8))
    benchlib.table(
        ("step", "seconds"),
        [("build synthetic buffers (not part of the scrape)",
          "%.2f" % r["fill_s"]),
         ("baseline: snapshot() + text report, best of 3",
          "%.2f" % r["report_s"]),
         ("before: scrape written by generate_latest, best of 3",
          "%.2f" % r["before_s"]),
         ("before: scrape written by generate_latest, worst of 3",
          "%.2f" % r["before_worst_s"]),
         ("scrape (kvmexit.exposition), best of 3", "%.2f" % r["best_s"]),
         ("scrape (kvmexit.exposition), worst of 3", "%.2f" % r["worst_s"]),
         ("kernel copy-out of those bytes at %s/s (estimate, apart)"
          % benchlib.human(rate), "%.2f" % (r["bytes"] / rate))])
    print("series: %d; /metrics text: %s; peak memory of the model process: "
          "%s (the buffers: %s)" % (r["series"], benchlib.human(r["text"]),
                                    benchlib.human(r["peak"]),
                                    benchlib.human(r["bytes"])))
    print("scrape / report: %.2f" % (r["best_s"] / r["report_s"]))
    met = r["best_s"] <= TARGET_S
    print("target: scrape <= %.1f s: %s (%.2f s; with the estimated kernel "
          "copy-out %.2f s)" % (TARGET_S, "met" if met else "MISSED",
                                r["best_s"], r["best_s"] + r["bytes"] / rate))
    return met, r["best_s"]


def main():
    return benchlib.model_bench_main(__doc__, real_maps, modeled, model)


if __name__ == "__main__":
    sys.exit(main())
