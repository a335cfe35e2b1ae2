#!/usr/bin/python3
"""kvmexit's views on real arm64 exits (in the arm64 lab).

    tests/lab/run --lab arm64 --outdir OUT -- \\
        /usr/bin/python3 tests/lab/arm64_kvmexit.py OUT

The arm64 sibling of tests/lab/scenario.py, on its helpers:
  1. starts the VMs of GUESTS (tests/lab/arm64_guest.py), held before their
     first KVM_RUN;
  2. starts every tracer of tracers() -- kvmexit.py with the options of
     one or more views each, raw tracepoint and regular one -- and waits
     until each is attached (it has printed its first line): each compiles
     in the lab, which takes from about 10 s to minutes when the host is
     busy, so views share a run where they can;
  3. arms the kernel's own count, a hist trigger on kvm:kvm_exit keyed by
     thread, ret and esr_ec, releases the VMs and waits for them;
  4. reads and disarms the hist trigger, scrapes the exporter's /metrics,
     then ends the tracers (SIGINT, SIGTERM for the exporter; those given a
     duration end by themselves).
Writes OUT/arm64_kvmexit.json: the VMs' reports, the hist rows, the scrape
and each tracer's argv, exit status, stdout and stderr.
tests/lab/test_lab_arm64_kvmexit.py checks every view against the hist
counts and the exact exits the VMs promise.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, LAB_DIR)
from arm64_scenario import hist_rows  # noqa: E402
from scenario import (PYTHON, collect, read_json,  # noqa: E402
                      start_attached, wait_for)

EVENT = "/sys/kernel/tracing/events/kvm/kvm_exit"
HIST_KEYS = "hist:keys=common_pid,ret,esr_ec"
COMPILES = 2                    # at once, one per CPU of the lab
ATTACH_TIMEOUT = 2400           # s, for all; a busy host slows the emulator
EXPORTER = "127.0.0.1:9464"

# name: arm64_guest.py arguments.  qemu: three vCPUs named like QEMU's,
# each with its own traps and counts; small: a second VM; other: a VMM
# that does not name its threads like QEMU.
GUESTS = {
    "qemu": ["--vcpus", "3"] + [arg for step in (
        "0@mmio-write:0x10000000/4:7", "0@hvc:0x84000000:4",
        "0@mrs:ID_AA64PFR0_EL1:2",
        "1@hvc:0x84000000:3", "1@smc:0x84000000:2", "1@wfi:2",
        "1@mrs:OSLSR_EL1:5",
        "2@mmio-read:0x10001000/8:5", "2@mrs:ID_AA64ISAR0_EL1:1",
        "2@hvc:0x80000000:6") for arg in ("--do", step)],
    "small": ["--vcpus", "2"] + [arg for step in (
        "mmio-write:0x10000000/4:3", "1@hvc:0x84000000:2",
        "0@mrs:ID_AA64PFR0_EL1:4") for arg in ("--do", step)],
    "other": ["--vcpus", "2", "--thread-name", "vcpu-worker-{n}",
              "--do", "hvc:0x84000000:1"],
}

# Started once the others are attached, so that their time runs while the
# VMs do; long enough for them to finish under the emulator.
DURATION = 60


def tracers(guests):
    """name: (kvmexit arguments, how it ends: a signal or 'self')."""
    qemu, small, other = (guests[n] for n in ("qemu", "small", "other"))

    def tid(guest, index):
        return str(guest["vcpus"][index]["tid"])

    sigint, sigterm = signal.SIGINT, signal.SIGTERM
    return {
        "all": (["-d"], sigint),
        "all_tracepoint": (["--probe", "tracepoint", "-d"], sigint),
        "pid": (["-p", str(qemu["pid"])], sigint),
        "pid_alltids": (["-p", str(qemu["pid"]), "-a"], sigint),
        "vcpu1": (["-p", str(qemu["pid"]), "-v", "1"], sigint),
        # Refused before compiling: no vCPU ids on arm64 without names.
        "vcpu_other": (["-p", str(other["pid"]), "-v", "1"], sigint),
        "tid": (["--probe", "tracepoint", "-t", tid(qemu, 2)], sigint),
        "tids": (["-T", tid(qemu, 0) + "," + tid(small, 1)], sigint),
        # Intervals, JSON and --latency in one run.
        "interval_json": (["-i", "1", "--json", "--latency", "-p",
                           str(qemu["pid"])], sigint),
        "prometheus": (["--prometheus", EXPORTER, "--latency"], sigterm),
        # A duration, CSV and the process names, on the tracepoint.
        "duration_csv": (["--probe", "tracepoint", "--csv", "--comm", "-p",
                          str(small["pid"]), str(DURATION)], "self"),
    }


def start_guest(name, args, out):
    report = os.path.join(out, "guest-%s.json" % name)
    proc = subprocess.Popen([PYTHON, os.path.join(LAB_DIR, "arm64_guest.py")]
                            + args + ["--report", report,
                                      "--hold", os.path.join(out, "go")])
    return proc, report


def scrape():
    try:
        with urllib.request.urlopen("http://%s/metrics" % EXPORTER,
                                    timeout=60) as r:
            return r.read().decode()
    except OSError as e:
        return "scrape failed: %s" % e


def end(running, plan):
    """Each tracer's argv, exit status, stdout and stderr."""
    for name, (proc, _, _) in running.items():
        if plan[name][1] != "self" and proc.poll() is None:
            proc.send_signal(plan[name][1])
    return collect(running, plan, DURATION + 120)


def main(out):
    # The lab's /init leaves loopback down; the exporter listens there.
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    guests = {name: start_guest(name, args, out)
              for name, args in GUESTS.items()}
    for name, (proc, report) in guests.items():
        wait_for(lambda: (read_json(report) or {}).get("state") == "ready" or
                 proc.poll() is not None, 120, "guest " + name)
        if proc.poll() is not None:
            raise SystemExit("arm64_kvmexit: guest %s failed" % name)
    plan = tracers({name: read_json(report)
                    for name, (_, report) in guests.items()})

    running, started = {}, time.monotonic()
    deadline = started + ATTACH_TIMEOUT
    for name in plan:
        if name != "duration_csv":
            start_attached(running, name, plan[name][0], out, COMPILES,
                           deadline)
    start_attached(running, "duration_csv", plan["duration_csv"][0], out, 1,
                   deadline)
    print("arm64_kvmexit: %d tracers attached in %.0f s" %
          (len(running), time.monotonic() - started), flush=True)

    with open(EVENT + "/trigger", "w") as f:
        f.write(HIST_KEYS)
    released = time.monotonic()
    open(os.path.join(out, "go"), "w").close()
    statuses = {name: proc.wait() for name, (proc, _) in guests.items()}
    ran = time.monotonic() - released
    hist = hist_rows("kvm_exit")
    with open(EVENT + "/trigger", "w") as f:
        f.write("!" + HIST_KEYS)
    metrics = scrape()

    results = end(running, plan)
    with open(os.path.join(out, "arm64_kvmexit.json"), "w") as f:
        json.dump({"guests": {n: read_json(r) for n, (_, r) in
                              guests.items()},
                   "guest_status": statuses, "guest_seconds": ran,
                   "hist": hist, "metrics": metrics, "tracers": results},
                  f, indent=1)
    print("arm64_kvmexit: VMs ran %.1f s; results in %s" % (ran, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
