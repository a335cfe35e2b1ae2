#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Series a fleet host exports, by --labels and --latency-labels.

    /usr/bin/python3 tests/bench/series.py [VMS ...]   (default 10 200 1000)

A host of VMS VMs x 8 vCPUs (one thread each) x 30 exit reasons, every
one with exits and, with --latency, a handling-time histogram.  The
snapshot is built in memory (what kvmexit's Ledger.read() returns; no
kernel table is read: report_time.py and scrape.py measure that part) and
fed to kvmexit.Exporter, which /metrics runs: one scrape through
prometheus_client's generate_latest.  Each case runs in a child process of
its own; printed per case: samples (series) in the text, its bytes, the
scrape's time (best of 3) and the exporter's memory (the child's peak
resident set less its resident set before the first scrape; the snapshot
itself is not counted).  Target: default labels, 200 VMs, --latency: at
most 50,000 series.
"""

import importlib.metadata
import os
import resource
import sys
import time

import benchlib
from benchlib import kvmexit

VCPUS, REASONS = 8, 30
# SVM codes with a direct slot: 30 of them.
CODES = tuple(range(0x60, 0x60 + 24)) + (0x00, 0x04, 0x10, 0x14, 0x40, 0x4e)
TARGET = 50_000
ALL = kvmexit.SERIES_LABELS
CASES = (  # (name, labels, latency labels or None)
    ("default", kvmexit.DEFAULT_LABELS, None),
    ("default --latency", kvmexit.DEFAULT_LABELS,
     kvmexit.DEFAULT_LATENCY_LABELS),
    ("--latency --latency-labels vm,reason", kvmexit.DEFAULT_LABELS,
     ("vm", "reason")),
    ("--labels vm,reason --latency", ("vm", "reason"),
     kvmexit.DEFAULT_LATENCY_LABELS),
    ("all labels --latency (before)", ALL, ALL),
)


def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def host(vms, latency):
    """The snapshot of a host: VM v is process 10000 + v, its vCPU thread
    i thread 20000 + 8 v + i."""
    counts, lat, vcpu_ids = {}, {}, {}
    for v in range(vms):
        tgid = 10000 + v
        for i in range(VCPUS):
            tid = 20000 + VCPUS * v + i
            vcpu_ids[(tgid, tid)] = i
            for n, code in enumerate(CODES):
                key = (tgid, tid, kvmexit.ISA_SVM, code)
                counts[key] = 1 + (v + i + n) % 97
                if latency:
                    hist = [0] * kvmexit.LAT_BUCKETS
                    hist[40 + n] = counts[key]
                    lat[key] = kvmexit.Latency(counts[key],
                                               1000 * counts[key], 5000, hist)
    return kvmexit.Snapshot(counts, vcpu_ids, [0] * len(kvmexit.LOST), lat)


class Names(kvmexit.VmNames):
    def read(self, tgid):
        return "vm-%d" % tgid


def case(vms, labels, latency_labels):
    from prometheus_client import CollectorRegistry, generate_latest
    snap = host(vms, latency_labels is not None)
    exporter = kvmexit.Exporter(lambda: snap, kvmexit.ReasonNames(),
                                kvmexit.Selection("all threads", "all"),
                                Names(), latency_labels is not None,
                                {"version": kvmexit.VERSION}, None, labels,
                                latency_labels)
    registry = CollectorRegistry()
    registry.register(exporter)
    before = rss()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        text = generate_latest(registry)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    series = sum(1 for line in text.split(b"\n")
                 if line and not line.startswith(b"#"))
    exits = sum(1 for line in text.split(b"\n")
                if line.startswith(b"kvm_exits_total{"))
    assert exits == len({tuple(x for x, name in zip(
        ("vm-%d" % k[0], k[0], k[1] % VCPUS, "svm", k[3]), ALL)
        if name in labels) for k in snap.counts})
    return series, len(text), min(times), peak - before


def in_child(vms, labels, latency_labels):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.write(w, repr(case(vms, labels, latency_labels)).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        data += chunk
    os.waitpid(pid, 0)
    return eval(data.decode())


def main(argv):
    sizes = [int(a) for a in argv] or [10, 200, 1000]
    rows, met = [], None
    for vms in sizes:
        for name, labels, latency_labels in CASES:
            if vms > 200 and labels == ALL and latency_labels == ALL:
                continue        # 4.3M series: minutes and GiBs here
            series, size, seconds, memory = in_child(vms, labels,
                                                     latency_labels)
            rows.append((vms, name, series, benchlib.human(size),
                         "%.2f" % seconds, benchlib.human(memory)))
            if vms == 200 and name == "default --latency":
                met = series <= TARGET
    print("Series of %s VMs x %d vCPUs x %d reasons (one scrape, "
          "prometheus_client %s, Python %s)"
          % ("/".join(map(str, sizes)), VCPUS, REASONS,
             importlib.metadata.version("prometheus_client"),
             sys.version.split()[0]))
    benchlib.table(("VMs", "labels", "series", "/metrics", "scrape s",
                    "exporter memory"), rows)
    if met is not None:
        print("target: default labels, 200 VMs, --latency: <= %d series: %s"
              % (TARGET, "met" if met else "MISSED"))
    return 0 if met in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
