#!/usr/bin/python3
"""kvmexit --detail in the arm64 lab, and the kernel's own counts.

    arm64_detail.py OUTDIR          (in the arm64 lab, as root)

Runs from the repository's top directory:
  1. starts arm64_guest.py with arm64_scenario.py's program (3 vCPUs: MMIO
     writes and reads, HVCs, an SMC, WFIs, trapped register reads), held
     before it runs;
  2. starts `kvmexit --detail --json -p PID` on the raw probe (arm64's
     default), the same on the tracepoint, and a text `kvmexit --detail
     -p PID -a`, one compile at a time, and waits until each is attached;
  3. arms hist triggers, per thread, on every event --detail reads, keyed
     by the fields it keeps (kvm_guest_fault and kvm_handle_sys_reg by
     their ESR), then releases the guest;
  4. reads the hist counts once the guest is done, and ends the tracers.
Writes OUTDIR/arm64_detail.json: the guest's report (the exact counts it
must cause), the hist rows and each tracer's output.
tests/lab/test_lab_arm64_detail.py checks them.
"""

import json
import os
import signal
import subprocess
import sys

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, LAB_DIR)
from arm64_scenario import GUEST  # noqa: E402
from detail_scenario import (release_under_hists,  # noqa: E402
                             start_one_at_a_time)
from scenario import finish, read_json, wait_for  # noqa: E402

PYTHON = "/usr/bin/python3"

# (event, keys after common_pid): at most 3 keys a trigger, so kvm_mmio
# takes two.
HISTS = (
    ("kvm_exit", ("ret", "esr_ec")),
    ("kvm_wfx_arm64", ("is_wfe",)),
    ("kvm_hvc_arm64", ("r0", "imm")),
    ("kvm_handle_sys_reg", ("hsr",)),
    ("kvm_guest_fault", ("ipa", "hsr")),
    ("kvm_mmio", ("gpa", "type")),
    ("kvm_mmio", ("gpa", "len")),
    ("kvm_userspace_exit", ("reason", "errno")),
)

TRACERS = {
    "raw": ["--detail", "--json"],
    "tracepoint": ["--detail", "--json", "--probe", "tracepoint"],
    "text": ["--detail", "-a"],
}


def main(out):
    report = os.path.join(out, "guest.json")
    hold = os.path.join(out, "go")
    guest = subprocess.Popen([PYTHON, os.path.join(LAB_DIR, "arm64_guest.py"),
                              *GUEST, "--report", report, "--hold", hold])
    wait_for(lambda: (read_json(report) or {}).get("state") == "ready" or
             guest.poll() is not None, 120, "the guest")
    if guest.poll() is not None:
        raise SystemExit("arm64_detail: the guest failed")
    pid = read_json(report)["pid"]

    tracers = start_one_at_a_time(TRACERS, pid, out)
    status, hists = release_under_hists(guest, hold, HISTS, timeout=600)

    results = {name: finish(tracer, signal.SIGINT, TRACERS[name])
               for name, tracer in tracers.items()}
    with open(os.path.join(out, "arm64_detail.json"), "w") as f:
        json.dump({"guest": read_json(report), "guest_status": status,
                   "hist": hists, "tracers": results}, f, indent=1)
    print("arm64_detail: results in %s" % out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
