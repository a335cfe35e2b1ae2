"""A VM of 11 vCPUs started after kvmexits with a thread table of 4 (in
the lab).

    tests/lab/run --outdir OUT -- /usr/bin/python3 tests/lab/growth.py OUT

Runs inside the lab (tests/lab/run), from the repository's top directory:
  1. starts a real Prometheus (tests/lab/prometheus.py) on loopback,
     scraping kvmexit's exporter every second;
  2. starts three kvmexits, each with --max-threads 4: a text report at
     the end (--comm), a JSON report every second (-i 1 --json), and the
     exporter (--prometheus 127.0.0.1:PORT);
  3. arms the kernel's own count, a hist trigger on kvm:kvm_exit keyed by
     thread and exit reason;
     The exporter also has --detail, and two more hist triggers count
     what it keeps of ports (kvm_exit's info1) and MSRs (kvm_msr);
  4. runs a real QEMU of 11 vCPUs (tests/lab/qemu_vm.py: Debian's
     qemu-system-x86_64 with KVM, -name guest=qemu11, a firmware whose
     vCPUs make known port and MSR exits): held with -S until its threads
     are listed, its 11 vCPUs then start within milliseconds, before any
     tick of kvmexit's, and must find the free thread table (4 + 8);
  5. after a retirement tick, runs one VM of 11 vCPUs the same way
     (tests/lab/guest.py as fleet.py runs it, named -name guest=big), each
     vCPU with its own IOIO and CR4 counts;
  6. waits for a tick and a scrape, reads the PromQL answers and the hist
     triggers, and ends the kvmexits (SIGINT for text and JSON, SIGTERM
     for the exporter).
It writes OUT/growth.json: both VMs' reports, the hist counts, the PromQL
answers and each kvmexit's argv, exit status, stdout and stderr.
tests/lab/test_lab_growth.py boots the lab once for it and checks them.
"""

import json
import os
import signal
import subprocess
import sys
import time

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, LAB_DIR)
import fleet  # noqa: E402
import qemu_vm  # noqa: E402
from detail_scenario import arm, read_hists  # noqa: E402
from scenario import (HIST_KEYS, PYTHON, TRIGGER, finish,  # noqa: E402
                      read_hist, read_json)

VCPUS = 11
MAX_THREADS = 4
VM = "big"
QEMU_VM = "qemu11"
# What --detail keeps of ports and MSRs, counted by the kernel per thread.
DETAIL_HISTS = (("kvm_exit", ("exit_reason", "info1")),
                ("kvm_msr", ("ecx", "write")))
EXPORTER = "127.0.0.1:9418"
PROMETHEUS_PORT = 9091
GAP = 2.5                       # a retirement and growth tick, then some


def guest_args():
    """vCPU v does 40 + 3v port writes and 1 + v % 5 CR4 round trips."""
    return ["--vcpus", str(VCPUS),
            "--io", ",".join(str(40 + 3 * v) for v in range(VCPUS)),
            "--cr4", ",".join(str(1 + v % 5) for v in range(VCPUS))]


def tracer_args():
    limit = ["--max-threads", str(MAX_THREADS)]
    return {"text": ["--comm"] + limit,
            "json": ["-i", "1", "--json"] + limit,
            "exporter": ["--prometheus", EXPORTER, "-d", "--detail"] + limit}


def promql_capacity():
    return 'kvmexit_table_capacity{table="pcpu_kvm_stat"}'


def promql(server, at):
    window = "1h"
    queries = {
        "exits": "last_over_time(kvm_exits_total[%s])" % window,
        "lost": "max_over_time(kvmexit_lost_exits_total[%s])" % window,
        "capacity": promql_capacity(),
        "at_limit": "kvmexit_thread_table_at_limit",
        "details": "last_over_time(kvm_exit_details_total[%s])" % window,
        "details_dropped": "max_over_time(kvm_exit_details_dropped_total"
                           "[%s])" % window,
        "details_lost": "max_over_time(kvmexit_detail_lost_total"
                        "[%s])" % window,
    }
    return fleet.query_all(server, queries, at)


def main(out):
    return fleet.with_prometheus(out, tracer_args(), run, EXPORTER,
                                 PROMETHEUS_PORT)


def run(out, plan, server):
    tracers = {name: fleet.start_attached(name, plan[name], out)
               for name in ("text", "json", "exporter")}
    server.wait_for_scrape(after=time.time())
    print("growth: kvmexits attached, Prometheus scraping", flush=True)
    with open(TRIGGER, "w") as f:
        f.write(HIST_KEYS)
    for event, keys in DETAIL_HISTS:
        arm(event, keys)
    qemu_report = os.path.join(out, "qemu-%s.json" % QEMU_VM)
    qemu_status = subprocess.run([PYTHON, qemu_vm.__file__, QEMU_VM,
                                  qemu_report]).returncode
    time.sleep(GAP)
    qemu_capacity = server.query(promql_capacity(), fleet.scraped(server))
    report = os.path.join(out, "guest-%s.json" % VM)
    status = subprocess.run([PYTHON, fleet.__file__, "vm", "-name",
                             "guest=" + VM] + guest_args() +
                            ["--report", report]).returncode
    time.sleep(GAP)
    answers = promql(server, fleet.scraped(server))
    hist = read_hist()
    detail_hists = {event: read_hists(event) for event, _ in DETAIL_HISTS}
    for event, keys in DETAIL_HISTS:
        arm(event, keys, on=False)
    with open(TRIGGER, "w") as f:
        f.write("!" + HIST_KEYS)
    results = {name: finish(tracers.pop(name), how, plan[name])
               for name, how in (("text", signal.SIGINT),
                                 ("json", signal.SIGINT),
                                 ("exporter", signal.SIGTERM))}
    with open(os.path.join(out, "growth.json"), "w") as f:
        json.dump({"guest": read_json(report), "guest_status": status,
                   "qemu": read_json(qemu_report),
                   "qemu_status": qemu_status,
                   "qemu_capacity": [[m, v] for m, v in qemu_capacity],
                   "hist": hist, "detail_hist": detail_hists,
                   "promql": answers, "tracers": results},
                  f, indent=1)
    print("growth: done; results in %s" % out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
