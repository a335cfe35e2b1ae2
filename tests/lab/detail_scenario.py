#!/usr/bin/python3
"""kvmexit --detail on a guest of chosen exits, and the kernel's own counts.

    tests/lab/run --outdir OUT -- \
        /usr/bin/python3 tests/lab/detail_scenario.py OUT

Runs inside the lab (tests/lab/run), from the repository's top directory:
  1. starts a guest (tests/lab/guest.py) whose two vCPUs write and read
     chosen ports, MSRs and MMIO addresses, make chosen hypercalls and take
     chosen exceptions a known number of times, held before it runs;
  2. starts `kvmexit --detail --latency --json -p PID` and a text
     `kvmexit --detail -p PID -a`, and waits until both are attached;
  3. arms hist triggers on every tracepoint --detail reads, keyed by
     thread and the fields it keeps, then releases the guest;
  4. reads the hist counts once the guest is done, and ends the tracers.
It writes OUT/detail.json: the guest's report (with the exact counts it
must cause), the hist counts, and each tracer's output.
tests/lab/test_lab_detail.py boots the lab once for it and checks.
"""

import json
import os
import re
import signal
import subprocess
import sys

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, LAB_DIR)
from scenario import (attached, finish, read_json,  # noqa: E402
                      start_tracer, wait_for)

EVENTS = "/sys/kernel/tracing/events/kvm"
PYTHON = "/usr/bin/python3"
ATTACH_TIMEOUT = 600

# vCPU 0 and vCPU 1 do different things, so that sub-counts are checked
# per thread.  MSRs: 0x1b and 0x6e0 are handled in KVM (kvm_msr), 0x4b564dff
# is unknown to KVM and goes out to user space.  Hypercall numbers KVM
# does not act on.  Each MMIO page belongs to one vCPU.
GUEST = ["--io", "0", "--vcpus", "2",
         "--do", "0@out:0x70/1:10", "--do", "0@in:0x71/1:7",
         "--do", "0@out:0x510/2:5", "--do", "0@in:0xcfc/4:3",
         "--do", "0@rdmsr:0x1b:6", "--do", "0@wrmsr:0x6e0:4",
         "--do", "0@rdmsr:0x4b564dff:2",
         "--do", "0@cpuid:1:5", "--do", "0@hypercall:0x99:4",
         "--do", "0@mmio-write:0xd0000000/4:3",
         "--do", "0@mmio-read:0xd0000010/2:2",
         "--do", "0@exc:6:2",
         "--do", "1@out:0x70/1:4", "--do", "1@wrmsr:0x1b:3",
         "--do", "1@hypercall:0x77:2", "--do", "1@mmio-write:0xd0001000/1:5",
         "--do", "1@exc:6:1"]

# The kernel's own counts of what --detail keeps, per thread (common_pid):
# hist triggers of at most 3 keys each (the kernel's limit), several on one
# event where --detail keeps more fields of it.
HISTS = (
    ("kvm_exit", ("exit_reason", "info1")),
    ("kvm_exit", ("exit_reason", "info2")),
    ("kvm_exit", ("exit_reason", "intr_info")),
    ("kvm_msr", ("ecx", "write")),
    ("kvm_hypercall", ("nr",)),
    ("kvm_mmio", ("gpa", "type")),
    ("kvm_mmio", ("gpa", "len")),
    ("kvm_fast_mmio", ("gpa",)),
    ("kvm_page_fault", ("fault_address", "error_code")),
    ("kvm_userspace_exit", ("reason", "errno")),
)

TRACERS = {
    "json": ["--detail", "--latency", "--json"],
    "text": ["--detail", "-a"],
}


def trigger(keys):
    return "hist:keys=common_pid," + ",".join(keys)


def arm(event, keys, on=True):
    # Appended: '>' would replace the event's other triggers.
    with open("%s/%s/trigger" % (EVENTS, event), "a") as f:
        f.write(("" if on else "!") + trigger(keys))


def read_hists(event):
    """{keys: [{field: value, ..., "count": n}]} of an event's triggers."""
    with open("%s/%s/hist" % (EVENTS, event)) as f:
        text = f.read()
    hists = {}
    for section in text.split("# event histogram")[1:]:
        keys = re.search(r"hist:keys=([\w,]+)", section).group(1)
        rows = hists[",".join(keys.split(",")[1:])] = []
        for fields, hits in re.findall(r"\{ (.*?) \} hitcount:\s*(\d+)",
                                       section):
            row = {name: int(value) for name, value in
                   re.findall(r"(\w+):\s*(-?\d+)", fields)}
            row["count"] = int(hits)
            rows.append(row)
    return hists


def start_one_at_a_time(specs, pid, out):
    """Start a kvmexit per {name: args} on PID, each once the one before
    has attached: a compile takes a few hundred MB under the emulator."""
    tracers = {}
    for name, args in specs.items():
        proc, stdout, stderr = start_tracer("detail-" + name,
                                            args + ["-p", str(pid)], out)
        tracers[name] = (proc, stdout, stderr)
        wait_for(lambda: attached((stdout, stderr), proc), ATTACH_TIMEOUT,
                 "kvmexit " + " ".join(args))
    return tracers


def release_under_hists(guest, hold, hists, timeout=None):
    """Arm each (event, keys) hist trigger, let the held guest go and, once
    it ended, read and disarm them: (its exit status, {event: rows})."""
    for event, keys in hists:
        arm(event, keys)
    open(hold, "w").close()
    status = guest.wait(timeout=timeout)
    rows = {event: read_hists(event) for event, _ in hists}
    for event, keys in hists:
        arm(event, keys, on=False)
    return status, rows


def main(out):
    report = os.path.join(out, "detail-guest.json")
    hold = os.path.join(out, "detail-go")
    guest = subprocess.Popen([PYTHON, os.path.join(LAB_DIR, "guest.py")] +
                             GUEST + ["--report", report, "--hold", hold])
    wait_for(lambda: (read_json(report) or {}).get("state") == "ready" or
             guest.poll() is not None, 60, "the guest")
    if guest.poll() is not None:
        raise SystemExit("detail_scenario: the guest failed")
    pid = read_json(report)["pid"]

    tracers = start_one_at_a_time(TRACERS, pid, out)
    status, hists = release_under_hists(guest, hold, HISTS)

    results = {name: finish(tracer, signal.SIGINT, TRACERS[name])
               for name, tracer in tracers.items()}
    with open(os.path.join(out, "detail.json"), "w") as f:
        json.dump({"guest": read_json(report), "guest_status": status,
                   "hist": hists, "tracers": results}, f, indent=1)
    print("detail_scenario: results in %s" % out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
