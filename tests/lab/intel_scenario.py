#!/usr/bin/python3
"""One guest run in the Intel lab, watched by kvmexit's two probes.

    tests/lab/run --lab intel --outdir OUT -- /usr/bin/python3 \\
        tests/lab/intel_scenario.py OUT

Runs inside the Intel lab (tests/lab/intel.py), from the repository's top
directory:
  1. starts a guest (tests/lab/guest.py, GUEST) of two vCPU threads with
     distinct, exactly known exits, held before its first KVM_RUN;
  2. starts `kvmexit.py --probe raw -d --json`, waits until it says it is
     tracing, then the same with `--probe tracepoint` (one bcc compile at
     a time: each takes minutes under Bochs);
  3. appends the kernel's own count, a hist trigger on kvm:kvm_exit keyed
     by thread and exit reason, releases the guest and waits for it;
  4. reads and removes the hist trigger, stops the tracers with SIGINT.
It writes OUT/intel.json: the guest's report, the hist counts, the
tracepoint's format file, each tracer's exit status, stdout and stderr,
and how long each step took.  tests/lab/test_lab_intel.py checks it.
"""

import json
import os
import signal
import subprocess
import sys
import time

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, LAB_DIR)
from scenario import (HIST_KEYS, TRIGGER, attached,  # noqa: E402
                      finish, read_hist, read_json, start_tracer, wait_for)

EVENT = "/sys/kernel/tracing/events/kvm/kvm_exit"
PYTHON = "/usr/bin/python3"
ATTACH_TIMEOUT = 1500           # per tracer; a bcc compile under Bochs
EXIT_TIMEOUT = 600              # a tracer's report and exit, under Bochs

# Per vCPU: N OUTs, CR4 writes (each flips a bit KVM owns: one CR_ACCESS),
# and --do steps with a different count on each vCPU, so that a
# count in the wrong thread or under the wrong reason shows.
GUEST = ["--io", "150,230", "--cr4", "3,5",
         "--do", "0@rdmsr:0x1a0:11", "--do", "1@rdmsr:0x1a0:13",
         "--do", "0@wrmsr:0x1a0:17", "--do", "1@wrmsr:0x1a0:19",
         "--do", "0@cpuid:0:23", "--do", "1@cpuid:1:29",
         "--do", "0@hypercall:100:31", "--do", "1@hypercall:100:37"]

TRACERS = {"raw": ["--probe", "raw", "-d", "--json"],
           "tracepoint": ["--probe", "tracepoint", "-d", "--json"]}


def start_attached(name, args, out, tracers):
    """Start kvmexit (into `tracers` at once) and wait until it traces."""
    tracers[name] = start_tracer(name, args, out)
    proc, stdout, stderr = tracers[name]
    wait_for(lambda: attached((stdout, stderr), proc), ATTACH_TIMEOUT,
             "kvmexit " + " ".join(args))
    if proc.poll() is not None:
        with open(stderr) as f:
            raise SystemExit("intel scenario: kvmexit %s exited with %d:\n%s"
                             % (" ".join(args), proc.returncode, f.read()))


def main(out):
    report = os.path.join(out, "guest.json")
    go = os.path.join(out, "go")
    guest = subprocess.Popen([PYTHON, os.path.join(LAB_DIR, "guest.py")] +
                             GUEST + ["--report", report, "--hold", go])
    tracers = {}
    try:
        return scenario(out, guest, report, go, tracers)
    finally:
        # A guest or tracer left behind would hold the lab's output pipe
        # open, and the lab would wait for it until its time ran out.
        for proc in [guest] + [t[0] for t in tracers.values()]:
            if proc.poll() is None:
                proc.kill()


def scenario(out, guest, report, go, tracers):
    times = {}
    started = time.monotonic()
    wait_for(lambda: (read_json(report) or {}).get("state") == "ready" or
             guest.poll() is not None, 300, "the guest")
    if guest.poll() is not None:
        raise SystemExit("intel scenario: the guest failed")

    for name, args in TRACERS.items():
        t0 = time.monotonic()
        start_attached(name, args, out, tracers)
        times["attach_" + name] = round(time.monotonic() - t0, 1)
        print("intel scenario: %s attached in %.0f s" %
              (name, times["attach_" + name]), flush=True)

    # Appended: '>' would replace any trigger already on the event.
    with open(TRIGGER, "a") as f:
        f.write(HIST_KEYS)
    t0 = time.monotonic()
    open(go, "w").close()
    guest_status = guest.wait()
    times["guest"] = round(time.monotonic() - t0, 1)
    hist = read_hist()
    with open(TRIGGER, "a") as f:
        f.write("!" + HIST_KEYS)

    results = {name: finish(tracer, signal.SIGINT, TRACERS[name],
                            EXIT_TIMEOUT) for name, tracer in tracers.items()}
    with open(EVENT + "/format") as f:
        fmt = f.read()
    times["scenario"] = round(time.monotonic() - started, 1)
    with open(os.path.join(out, "intel.json"), "w") as f:
        json.dump({"guest": read_json(report), "guest_status": guest_status,
                   "guest_args": GUEST, "hist": hist, "format": fmt,
                   "tracers": results, "seconds": times,
                   "cpu": cpu_model()}, f, indent=1)
    print("intel scenario: done in %.0f s (guest clock)" % times["scenario"])
    return 0


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
