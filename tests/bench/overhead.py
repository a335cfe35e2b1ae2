#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Guest-visible cost of tracing, on real exits in the lab.

    /usr/bin/python3 tests/bench/overhead.py [--seconds 5] [--rounds 3]

(as root; boots the lab, about 3 minutes.)  Inside the lab a guest
(tests/lab/guest.py, throughput mode) loops "10 CR4 round trips, one port
write" on one vCPU for a few seconds: 21 exits a loop, 20 handled in KVM
and one in user space.  Its exit rate is measured with no tracer, with
kvmexit on the raw tracepoint (the default on AMD), on the regular
tracepoint, and with --detail (the regular tracepoint, the last exit kept
per thread, a port sub-key and a kvm_userspace_exit event per port
write), in alternating rounds of the same boot; the table gives the
median rate of each and its ratio to no tracer.  The lab runs under
QEMU's emulator, so the absolute rates are an emulated CPU's; the ratios
are the result.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
LAB = os.path.join(REPO, "tests", "lab")
PYTHON = "/usr/bin/python3"
SETUPS = {"no tracer": None,
          "kvmexit, raw tracepoint": ["--probe", "raw"],
          "kvmexit, tracepoint": ["--probe", "tracepoint"],
          "kvmexit --detail": ["--detail"]}


def guest_rate(seconds, out):
    """Exits per second of a one-vCPU guest running for `seconds`."""
    report = os.path.join(out, "rate.json")
    subprocess.run([PYTHON, os.path.join(LAB, "guest.py"), "--vcpus", "1",
                    "--cr4", "10", "--seconds", str(seconds), "--report",
                    report], check=True, stdout=subprocess.DEVNULL)
    with open(report) as f:
        vcpu = json.load(f)["vcpus"][0]
    exits = sum(vcpu["expected"].values())
    return exits / vcpu["seconds"]


def start_tracer(args, out):
    """kvmexit, once its first line says the probe is attached."""
    log = os.path.join(out, "tracer.out")
    proc = subprocess.Popen([PYTHON, "kvmexit.py"] + args, cwd=REPO,
                            stdout=open(log, "w"),
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        with open(log) as f:
            if f.readline().startswith("Display"):
                return proc
        time.sleep(0.2)
    raise SystemExit("overhead: kvmexit %s exited with %d" %
                     (" ".join(args), proc.returncode))


def inside(seconds, rounds, out):
    rates = {name: [] for name in SETUPS}
    for _ in range(rounds):
        for name, args in SETUPS.items():
            tracer = start_tracer(args, out) if args else None
            rates[name].append(guest_rate(seconds, out))
            if tracer:
                tracer.send_signal(signal.SIGINT)
                tracer.wait()
    with open(os.path.join(out, "overhead.json"), "w") as f:
        json.dump(rates, f)


def table(rates):
    base = statistics.median(rates["no tracer"])
    lines = ["%-26s %14s %10s" % ("setup", "exits/s", "vs none")]
    for name, values in rates.items():
        rate = statistics.median(values)
        lines.append("%-26s %14.0f %10.3f" % (name, rate, rate / base))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--inside", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inside:
        return inside(args.seconds, args.rounds, args.inside)
    sys.path.insert(0, LAB)
    from lab import run_in_lab
    out = tempfile.mkdtemp(prefix="kvmexit-overhead-")
    rc, _ = run_in_lab([PYTHON, os.path.abspath(__file__), "--seconds",
                        str(args.seconds), "--rounds", str(args.rounds),
                        "--inside", out], timeout=1800, outdir=out,
                       quiet=True)
    if rc != 0:
        raise SystemExit("overhead: the lab run failed (%d)" % rc)
    with open(os.path.join(out, "overhead.json")) as f:
        rates = json.load(f)
    print("Guest exit rate, one vCPU, %d rounds of %g s (median):"
          % (args.rounds, args.seconds))
    print(table(rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
