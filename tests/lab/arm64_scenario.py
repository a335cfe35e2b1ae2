#!/usr/bin/python3
"""The arm64 lab's guest scenario: run arm64_guest.py under the kernel's
own counters; write what they counted.

    arm64_scenario.py OUTDIR        (in the arm64 lab, as root)

Sets hist triggers per vCPU thread on kvm_exit (ret, esr_ec) and on the
events whose keys fit a hist trigger's three (kvm_hvc_arm64 r0,
kvm_wfx_arm64 is_wfe, kvm_guest_fault ipa, kvm_userspace_exit reason),
and records kvm_sys_access and kvm_mmio, whose keys do not fit, in the
trace buffer.  Runs GUEST's program; writes OUTDIR/arm64.json: the
guest's report, the hist rows and the trace's events, per thread.
"""

import json
import os
import re
import subprocess
import sys

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
EVENTS = "/sys/kernel/tracing/events/kvm"
TRACE = "/sys/kernel/tracing/trace"

# Three vCPUs, every kind of step, different counts per vCPU and key.
GUEST = [arg for step in (
    "0@mmio-write:0x10000000/4:11", "0@hvc:0x84000000:5",
    "0@mrs:ID_AA64PFR0_EL1:3",
    "1@wfi:4", "1@hvc:0x12345678:2", "1@smc:0x84000000:1",
    "1@mrs:OSLSR_EL1:2", "1@mrs:MDRAR_EL1:1", "1@mrs:ACTLR_EL1:1",
    "2@mmio-read:0x10001000/8:3", "2@mmio-write:0x10002000/1:2",
    "2@hvc:0x80000000:1", "2@mrs:ID_AA64ISAR0_EL1:2",
    "2@mrs:ID_AA64MMFR0_EL1:1") for arg in ("--do", step)]

# event: the keys after common_pid (a hist trigger takes three at most).
HISTS = {"kvm_exit": "ret,esr_ec", "kvm_hvc_arm64": "r0,imm",
         "kvm_wfx_arm64": "is_wfe", "kvm_guest_fault": "ipa",
         "kvm_userspace_exit": "reason"}
# Events read from the trace: event -> (pattern, fields of its groups).
TRACED = {
    "kvm_sys_access": (r"\((\d+),(\d+),(\d+),(\d+),(\d+)\) (read|write)",
                       ("Op0", "Op1", "CRn", "CRm", "Op2", "is_write")),
    "kvm_mmio": (r"mmio (\S+) len (\d+) gpa 0x([0-9a-f]+)",
                 ("type", "len", "gpa")),
}
MMIO_TYPES = {"unsatisfied-read": 0, "read": 1, "write": 2}


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def hist_rows(event):
    """[{field: value, ..., "count": n}] of the event's hist trigger."""
    rows = []
    with open(f"{EVENTS}/{event}/hist") as f:
        for line in f:
            m = re.match(r"\{(.*)\} hitcount:\s*(\d+)", line.strip())
            if m:
                row = {k.strip(): int(v.split()[0], 0) for k, v in (
                    part.split(":", 1) for part in m.group(1).split(","))}
                row["count"] = int(m.group(2))
                rows.append(row)
    return rows


def traced_events():
    """[{"event", "pid", field: value...}] of TRACED, from the trace."""
    found = []
    with open(TRACE) as f:
        for line in f:
            m = re.match(r"\s*.*-(\d+)\s+\[\d+\].*?\s(kvm_\w+): (.*)", line)
            if not m or m.group(2) not in TRACED:
                continue
            pattern, fields = TRACED[m.group(2)]
            values = re.search(pattern, m.group(3)).groups()
            event = {"event": m.group(2), "pid": int(m.group(1))}
            for field, value in zip(fields, values):
                if field == "is_write":
                    event[field] = int(value == "write")
                elif field == "type":
                    event[field] = MMIO_TYPES[value]
                else:
                    event[field] = int(value, 16 if field == "gpa" else 10)
            found.append(event)
    return found


def main(outdir):
    for event, keys in HISTS.items():
        write(f"{EVENTS}/{event}/trigger", f"hist:keys=common_pid,{keys}")
    write("/sys/kernel/tracing/buffer_size_kb", "4096")
    write(TRACE, "")
    for event in TRACED:
        write(f"{EVENTS}/{event}/enable", "1")
    report = os.path.join(outdir, "guest.json")
    guest = subprocess.run(
        [sys.executable, os.path.join(LAB_DIR, "arm64_guest.py"), *GUEST,
         "--report", report], timeout=600)
    for event in TRACED:
        write(f"{EVENTS}/{event}/enable", "0")
    with open(report) as f:
        results = {"guest": json.load(f), "guest_status": guest.returncode,
                   "hist": {e: hist_rows(e) for e in HISTS},
                   "traced": traced_events()}
    with open(os.path.join(outdir, "arm64.json"), "w") as f:
        json.dump(results, f, indent=1)
    return guest.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
