#!/usr/bin/python3
"""How often the AMD lab freezes: tracepoints attached and detached again
and again while a 2-vCPU guest runs, over several boots.

    tests/lab/stress.py [--boots 5] [--seconds 120] [--accel tcg]
                        [--append idle=poll] [--json FILE]     (as root)

Each boot (amd.py's lab, with QEMU's `-accel ACCEL` and the extra kernel
arguments) runs a timed guest of two vCPUs (guest.py, CR4 round trips
and port writes) while one bcc program's raw tracepoint on kvm_exit and
regular tracepoints on kvm_exit, kvm_entry and kvm_userspace_exit are
attached and detached in a loop for SECONDS: each attach and detach
switches a static key, so the kernel patches its text and waits for every
CPU to take an IPI -- where the freeze was caught (README: the lab).  A
boot that stops beating its heart, or does not boot, is a freeze.  Prints
one line per boot and, at the end, boots, attach rounds and freezes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, LAB_DIR)
from core import GUEST_PYTHON, LabError, LabFrozen  # noqa: E402

PROGRAM = """
RAW_TRACEPOINT_PROBE(kvm_exit) { return 0; }
int tp_exit(void *ctx) { return 0; }
int tp_entry(void *ctx) { return 0; }
int tp_user(void *ctx) { return 0; }
"""
TRACEPOINTS = {"kvm:kvm_exit": "tp_exit", "kvm:kvm_entry": "tp_entry",
               "kvm:kvm_userspace_exit": "tp_user"}


def inside(seconds, out):
    """In the lab: the guest, and the attach loop; rounds to out/."""
    from bcc import BPF
    guest = subprocess.Popen([GUEST_PYTHON, os.path.join(LAB_DIR, "guest.py"),
                              "--vcpus", "2", "--cr4", "10", "--seconds",
                              "inf", "--report", os.path.join(out, "g.json")])
    b = BPF(text=PROGRAM)
    b.detach_raw_tracepoint("kvm_exit")     # attached at load; loop below
    rounds, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        b.attach_raw_tracepoint(tp="kvm_exit", fn_name="raw_tracepoint__"
                                "kvm_exit")
        for tp, fn in TRACEPOINTS.items():
            b.attach_tracepoint(tp=tp, fn_name=fn)
        time.sleep(0.05)
        b.detach_raw_tracepoint("kvm_exit")
        for tp in TRACEPOINTS:
            b.detach_tracepoint(tp)
        rounds += 1
        with open(os.path.join(out, "rounds"), "w") as f:
            f.write(str(rounds))
    guest.terminate()
    guest.wait()
    return 0


def boot_once(lab, kernel, seconds):
    """One boot; (rounds done, how it ended)."""
    out = tempfile.mkdtemp(prefix="kvmexit-stress-", dir="/var/tmp")
    try:
        rc, _ = lab.boot_and_run(
            [GUEST_PYTHON, os.path.abspath(__file__), "--inside", out,
             "--seconds", str(seconds)], kernel, lab.release(kernel),
            seconds + 900, out, None)
        how = "ok" if rc == 0 else f"status {rc}"
    except LabFrozen as e:
        how = "frozen while " + ("running" if e.booted else "booting") + \
            ": " + str(e).split("\n")[0]
        print(f"stress: {e}", flush=True)       # with its kernel log
    except LabError as e:
        how = "failed: " + str(e).split("\n")[0]
        print(f"stress: {e}", flush=True)
    try:
        with open(os.path.join(out, "rounds")) as f:
            rounds = int(f.read())
    except (FileNotFoundError, ValueError):
        rounds = 0
    return rounds, how


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--boots", type=int, default=5)
    p.add_argument("--seconds", type=int, default=120)
    p.add_argument("--accel", default="tcg")
    p.add_argument("--append", default="")
    p.add_argument("--json", help="append a summary line to this file")
    p.add_argument("--inside", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inside:
        return inside(args.seconds, args.inside)
    from amd import AmdLab
    lab = AmdLab()
    lab.accel, lab.kernel_args = args.accel, args.append
    kernel = lab.setup()
    total = {"accel": args.accel, "append": args.append, "boots": 0,
             "rounds": 0, "frozen": 0, "failed": 0, "seconds": args.seconds}
    for i in range(args.boots):
        started = time.monotonic()
        rounds, how = boot_once(lab, kernel, args.seconds)
        total["boots"] += 1
        total["rounds"] += rounds
        total["frozen"] += how.startswith("frozen")
        total["failed"] += how.startswith(("failed", "status"))
        print(f"stress: boot {i + 1} ({args.accel} {args.append}): "
              f"{rounds} attach rounds, {how}, "
              f"{time.monotonic() - started:.0f} s", flush=True)
    print("stress: " + json.dumps(total), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(total) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
