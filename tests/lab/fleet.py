"""VMs that come and go under long-running kvmexits (in the lab).

    tests/lab/run --outdir OUT -- /usr/bin/python3 tests/lab/fleet.py OUT

Runs inside the lab (tests/lab/run), from the repository's top directory:
  1. starts a real Prometheus (tests/lab/prometheus.py) on loopback,
     scraping kvmexit's exporter every second;
  2. starts two kvmexits with a thread table of 4 (--max-threads 4, room
     for 2 vCPU threads and the 2 CPUs' cache slots of the lab): one
     printing a JSON report every second (-i 1 --json), one serving
     Prometheus (--prometheus 127.0.0.1:PORT);
  3. arms the kernel's own count, a hist trigger on kvm:kvm_exit keyed by
     thread and exit reason;
  4. runs VMS VMs of 2 vCPUs (tests/lab/guest.py) one after another, each
     named like a QEMU guest (-name guest=vmNN) and with its own exact
     IOIO/CR4/HLT counts per vCPU; after the first half it restarts the
     exporter (SIGTERM, then a new one on the same port), as a service
     restart would;
  5. waits until Prometheus has scraped the final counts, reads what it
     stored with PromQL, reads and disarms the hist trigger, and ends the
     kvmexits (SIGINT for the JSON one, SIGTERM for the exporter).
Prometheus loads the operator's rules (deploy/kvmexit-rules.yml) and
evaluates them all along; at the end every query of the dashboard
(deploy/kvmexit-dashboard.json), every rule's expression, every recorded
series and the active alerts are read too (tests/dashboard.py).
It writes OUT/fleet.json: the guests' reports, the hist counts, the PromQL
answers, the kit's answers and each kvmexit's argv, exit status, stdout
and stderr.
tests/lab/test_lab_fleet.py boots the lab once for it and checks them.

`fleet.py vm -name guest=NAME GUEST_ARGS...` is one such VM: guest.py
with QEMU's -name on its command line, where kvmexit finds the VM's name.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, LAB_DIR)
sys.path.insert(0, os.path.dirname(LAB_DIR))
import dashboard  # noqa: E402
from prometheus import Prometheus, PrometheusError  # noqa: E402
from scenario import (HIST_KEYS, PYTHON, TRIGGER, attached,  # noqa: E402
                      finish, read_hist, read_json, start_tracer)

REPO = os.path.dirname(os.path.dirname(LAB_DIR))
RULES = os.path.join(REPO, "deploy", "kvmexit-rules.yml")
DASHBOARD = os.path.join(REPO, "deploy", "kvmexit-dashboard.json")
VMS = 20
VCPUS = 2
MAX_THREADS = 4
EXPORTER = "127.0.0.1:9417"
PROMETHEUS_PORT = 9090
RESTART_AFTER = VMS // 2
# kvmexit retires the threads of ended VMs once a second; a VM of 2 vCPUs
# needs the room of the VM before the last one (2 entries of the 4).
GAP = 2.0
LINGER = 1.5
ATTACH_TIMEOUT = 900            # bcc compiles slowly under the emulator
# Prometheus in the lab scrapes and evaluates the rules every 2 s, with 2 s
# for a scrape: every scrape and evaluation is emulated work, in the lab
# the fleet scenario spends most of its time in, and a machine busy with
# the other labs once stretched a scrape past 1 s.
SCRAPE = "2s"
# Long enough to cover every VM plus the pauses and the exporter restart:
# PromQL reads each series' last value in this window.
WINDOW = "1h"


def guest_args(i):
    """VM i: vCPU v does 30 + 2i + v port writes and 1 + (i + v) % 4 CR4
    round trips, so that no two (VM, vCPU) have the same counts."""
    return ["--io", ",".join(str(30 + 2 * i + v) for v in range(VCPUS)),
            "--cr4", ",".join(str(1 + (i + v) % 4) for v in range(VCPUS))]


def vm_name(i):
    return "vm%02d" % i


def run_vm(i, out):
    report = os.path.join(out, "guest-%s.json" % vm_name(i))
    rc = subprocess.run([PYTHON, os.path.abspath(__file__), "vm", "-name",
                         "guest=" + vm_name(i)] + guest_args(i) +
                        ["--report", report]).returncode
    return rc, read_json(report)


def start_attached(name, args, out):
    """Start a kvmexit and wait until it has attached (its first line)."""
    proc, stdout, stderr = start_tracer(name, args, out)
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while not attached((stdout, stderr), proc):
        if time.monotonic() > deadline:
            raise SystemExit("fleet: timed out waiting for " + name)
        time.sleep(0.5)
    if proc.poll() is not None:
        raise SystemExit("fleet: %s exited with %d: %s"
                         % (name, proc.returncode, open(stderr).read()))
    return proc, stdout, stderr


def tracer_args():
    return {
        "json": ["-i", "1", "--json", "--max-threads", str(MAX_THREADS)],
        "exporter": ["--prometheus", EXPORTER, "--max-threads",
                     str(MAX_THREADS), "--latency", "-d"],
    }


def promql(server, at):
    """The PromQL answers the test compares, as [[labels, value]], as they
    were at `at` (see scraped())."""
    queries = {
        # Each series' last stored value: also the series of VMs whose
        # threads were retired and dropped, and of the first exporter.
        "exits": "last_over_time(kvm_exits_total[%s])" % WINDOW,
        "per_vm_reason": "sum by (vm, reason) (last_over_time("
                         "kvm_exits_total[%s]))" % WINDOW,
        "lost": "max_over_time(kvmexit_lost_exits_total[%s])" % WINDOW,
        "live": "kvm_exits_total",
        "build": "kvmexit_build_info",
        "up": "up",
    }
    return query_all(server, queries, at)


def scraped(server):
    """Wait for a successful scrape of every target that began after now;
    return when the last of them began.  Queries are evaluated there: a
    scrape after it that ran out of time (the emulated lab starved of CPU
    by the machine's other work) would mark every series stale, and an
    instant query made later would find none."""
    states = server.wait_for_scrape(after=time.time())
    return max(last for _, last, _ in states.values())


def query_all(server, queries, at):
    """{name: PromQL} -> {name: [[labels, value], ...]}, as JSON keeps it."""
    return {name: [[labels, value] for labels, value in server.query(q, at)]
            for name, q in queries.items()}


def answer(server, query, at):
    """[query, [[labels, value]], error or None]: a query of the kit that
    Prometheus refuses is recorded, not raised, so that every one is."""
    try:
        return [query, [[labels, value] for labels, value in
                        server.query(query, at)], None]
    except PrometheusError as e:
        return [query, [], str(e)]


def recorded_names(path):
    with open(path) as f:
        groups = dashboard.yaml.safe_load(f)["groups"]
    return [rule["record"] for group in groups for rule in group["rules"]
            if "record" in rule]


def kit(server, at):
    """What the operator's kit gives on these exits at `at`: each
    dashboard query, each rule expression, each series a recording rule
    stored; and the alerts Prometheus has active (pending or firing)
    now."""
    return {
        "dashboard": [answer(server, q, at)
                      for q in dashboard.dashboard_queries(DASHBOARD)],
        "rules": [answer(server, q, at)
                  for q in dashboard.rule_expressions(RULES)],
        "recorded": [answer(server, name, at)
                     for name in recorded_names(RULES)],
        "alerts": server.api("alerts")["alerts"],
    }


def main(out):
    return with_prometheus(out, tracer_args(), run, EXPORTER,
                           PROMETHEUS_PORT, rules=[RULES])


def with_prometheus(out, plan, scenario, exporter, port, rules=()):
    """scenario(out, plan, server) while a Prometheus on `port` scrapes the
    exporter (and evaluates the rule files `rules`); its log ends in OUT."""
    # The TSDB on the lab's own disk: OUT is a 9p share.
    server = Prometheus(tempfile.mkdtemp(prefix="prometheus-"), [exporter],
                        port=port, interval=SCRAPE, timeout=SCRAPE,
                        rules=rules).start()
    try:
        return scenario(out, plan, server)
    finally:
        server.stop()
        shutil.copy(server.log, os.path.join(out, "prometheus.log"))


def run(out, plan, server):
    tracers = {name: start_attached(name, plan[name], out)
               for name in ("json", "exporter")}
    server.wait_for_scrape(after=time.time())
    print("fleet: kvmexits attached, Prometheus scraping", flush=True)

    with open(TRIGGER, "w") as f:
        f.write(HIST_KEYS)
    guests, statuses, results = {}, {}, {}
    for i in range(VMS):
        if i == RESTART_AFTER:
            # What the first exporter counted is in Prometheus before it
            # goes: its retirement tick, then a scrape after that.
            time.sleep(GAP)
            server.wait_for_scrape(after=time.time())
            results["exporter_first"] = finish(
                tracers.pop("exporter"), signal.SIGTERM, plan["exporter"])
            tracers["exporter"] = start_attached("exporter2",
                                                 plan["exporter"], out)
            server.wait_for_scrape(after=time.time())
            print("fleet: exporter restarted", flush=True)
        statuses[vm_name(i)], guests[vm_name(i)] = run_vm(i, out)
        time.sleep(GAP)
    # The last retirement tick and interval report, then a scrape after.
    time.sleep(GAP)
    at = scraped(server)
    answers = promql(server, at)
    kit_answers = kit(server, at)
    hist = read_hist()
    with open(TRIGGER, "w") as f:
        f.write("!" + HIST_KEYS)

    results["json"] = finish(tracers.pop("json"), signal.SIGINT,
                             plan["json"])
    results["exporter"] = finish(tracers.pop("exporter"),
                                 signal.SIGTERM, plan["exporter"])
    with open(os.path.join(out, "fleet.json"), "w") as f:
        json.dump({"guests": guests, "guest_status": statuses,
                   "hist": hist, "promql": answers, "kit": kit_answers,
                   "tracers": results,
                   "exporter": EXPORTER}, f, indent=1)
    print("fleet: %d VMs done; results in %s" % (len(guests), out))
    return 0


def vm_main(argv):
    """One VM: guest.py with `-name guest=NAME` on the command line.  The
    process stays a moment after its vCPUs have halted, as QEMU does: the
    exporter names a VM from /proc while it runs, at its once-a-second
    tick, and these guests' exits take less than that."""
    if len(argv) < 2 or argv[0] != "-name":
        sys.exit("usage: fleet.py vm -name guest=NAME GUEST_ARGS...")
    import guest
    status = guest.main(argv[2:])
    time.sleep(LINGER)
    return status


if __name__ == "__main__":
    if sys.argv[1:2] == ["vm"]:
        sys.exit(vm_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1]))
