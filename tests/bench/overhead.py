#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Guest-visible cost of tracing, on real exits in the lab.

    /usr/bin/python3 tests/bench/overhead.py [--seconds 5] [--rounds 3]

    /usr/bin/python3 tests/bench/overhead.py --lab intel [--rounds 3]

(as root; boots the lab, about 3 minutes; the Intel lab about 16.)

AMD lab (QEMU's emulator, SVM).  Inside the lab a guest
(tests/lab/guest.py, throughput mode) loops "10 CR4 round trips, one port
write" on one vCPU for a few seconds: 21 exits a loop, 20 handled in KVM
and one in user space.  Its exit rate is measured with no tracer, with
an empty program on the raw tracepoint (the floor: what any BPF tracer
of kvm_exit costs before it does any work), with
kvmexit on the raw tracepoint (the default on AMD), on the regular
tracepoint, and with --detail (the regular tracepoint, the last exit kept
per thread, a port sub-key and a kvm_userspace_exit event per port
write), in alternating rounds of the same boot; the table gives the
median rate of each and its ratio to no tracer.  The lab runs under
QEMU's emulator, so the absolute rates are an emulated CPU's; the ratios
are the result.

Intel lab (Bochs, VMX; tests/lab/intel.py).  On VMX writing CR4 back
makes no exit, so the guest there loops CPUID, an exit KVM handles
itself: one vCPU, --do cpuid:0:COUNT then HLT, COUNT calibrated at the
start to last about --seconds; its rate is its kvm_exit count (from
guest.py's report) over the vCPU's run time.  Each bcc compile takes
minutes under Bochs, so kvmexit's raw and tracepoint programs (and
the empty one) are compiled once, by kvmexit.py's own functions in this
process, and attached and detached around each guest run (what the guest pays for is
the attached program; kvmexit's process only sleeps meanwhile).  Rates
are measured by the guest's clock, which Bochs advances by the
instructions it emulates (ips in tests/lab/intel.py), so rounds repeat
almost exactly and the rates are emulated instructions', not a CPU's;
the ratios are the result.
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
# The floor: an empty program on the raw tracepoint, what any BPF tracer
# of kvm_exit costs the guest before it does any work.  It says "ready"
# once attached, as kvmexit says "Display ...".
EMPTY_C = "int empty(void *ctx) { return 0; }"
EMPTY = """
import time
from bcc import BPF
b = BPF(text=%r)
b.attach_raw_tracepoint(tp=b"kvm_exit", fn_name=b"empty")
try:
    print("ready", flush=True)
    time.sleep(3600)
except KeyboardInterrupt:
    pass
""" % EMPTY_C
KVMEXIT = [PYTHON, "kvmexit.py"]
SETUPS = {"no tracer": None,
          "empty program, raw": [PYTHON, "-c", EMPTY],
          "kvmexit, raw tracepoint": KVMEXIT + ["--probe", "raw"],
          "kvmexit, tracepoint": KVMEXIT + ["--probe", "tracepoint"],
          "kvmexit --detail": KVMEXIT + ["--detail"]}


def one_vcpu_guest(args, out):
    """Run a one-vCPU guest (tests/lab/guest.py ARGS); its vCPU's report."""
    report = os.path.join(out, "rate.json")
    subprocess.run([PYTHON, os.path.join(LAB, "guest.py"), "--vcpus", "1"] +
                   args + ["--report", report], check=True,
                   stdout=subprocess.DEVNULL)
    with open(report) as f:
        return json.load(f)["vcpus"][0]


def guest_rate(seconds, out):
    """Exits per second of a one-vCPU guest running for `seconds`."""
    vcpu = one_vcpu_guest(["--cr4", "10", "--seconds", str(seconds)], out)
    return sum(vcpu["expected"].values()) / vcpu["seconds"]


def start_tracer(name, argv, out):
    """A tracer, once its first line says its program is attached."""
    log = os.path.join(out, "tracer.out")
    proc = subprocess.Popen(argv, cwd=REPO, stdout=open(log, "w"),
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        with open(log) as f:
            if f.readline().endswith("\n"):
                return proc
        time.sleep(0.2)
    raise SystemExit("overhead: the tracer of %r exited with %d" %
                     (name, proc.returncode))


def counted_rate(count, out):
    """Exits per second of a one-vCPU guest doing `count` CPUIDs."""
    vcpu = one_vcpu_guest(["--io", "0", "--do", "cpuid:0:%d" % count], out)
    exits = sum(e["count"] for e in vcpu["expected_events"]["kvm_exit"])
    return exits / vcpu["seconds"]


def bcc_empty():
    from bcc import BPF
    return BPF(text=EMPTY_C)


class InProcessTracers:
    """kvmexit's raw and tracepoint programs, compiled once each, attached
    one at a time."""

    def __init__(self):
        sys.path.insert(0, REPO)
        import kvmexit
        self.kvmexit = kvmexit
        kvmexit.check_bcc()
        tp_dir = kvmexit.tracepoint_dir()
        selection = kvmexit.Selection("all threads", "all")
        layout = kvmexit.slot_layout()
        self.programs = {}
        for probe in ("raw", "tracepoint"):
            chosen = kvmexit.choose_probe(probe, tp_dir)
            b = kvmexit.load_program(kvmexit.Program(
                chosen, selection, kvmexit.MIN_MAX_THREADS, layout))
            self.programs[probe] = (chosen.kind, b)
            self.detach(probe)      # bcc attaches tracepoint programs
        self.programs["empty"] = ("empty", bcc_empty())

    def attach(self, probe):
        kind, b = self.programs[probe]
        if kind == "tracepoint":
            b.attach_tracepoint(tp=b"kvm:kvm_exit",
                                fn_name=b"tracepoint__kvm__kvm_exit")
        elif kind == "empty":
            b.attach_raw_tracepoint(tp=b"kvm_exit", fn_name=b"empty")
        else:
            self.kvmexit.attach_raw(b)

    def detach(self, probe):
        kind, b = self.programs[probe]
        if kind == "tracepoint":
            b.detach_tracepoint(b"kvm:kvm_exit")
        elif b"kvm_exit" in b.raw_tracepoint_fds:
            b.detach_raw_tracepoint(b"kvm_exit")


def inside_intel(seconds, rounds, out):
    tracers = InProcessTracers()
    probes = {"no tracer": None, "empty program, raw": "empty",
              "kvmexit, raw tracepoint": "raw",
              "kvmexit, tracepoint": "tracepoint"}
    # Calibrate: a COUNT that lasts about `seconds` with no tracer.
    count = max(1000, int(counted_rate(2000, out) * seconds))
    rates = {name: [] for name in probes}
    for _ in range(rounds):
        for name, probe in probes.items():
            if probe:
                tracers.attach(probe)
            rates[name].append(counted_rate(count, out))
            if probe:
                tracers.detach(probe)
    with open(os.path.join(out, "overhead.json"), "w") as f:
        json.dump(rates, f)


def inside(seconds, rounds, out):
    rates = {name: [] for name in SETUPS}
    for _ in range(rounds):
        for name, args in SETUPS.items():
            tracer = start_tracer(name, args, out) if args else None
            rates[name].append(guest_rate(seconds, out))
            if tracer:
                tracer.send_signal(signal.SIGINT)
                tracer.wait()
    with open(os.path.join(out, "overhead.json"), "w") as f:
        json.dump(rates, f)


def table(rates):
    """Median rate and its ratio to no tracer; the spread is each round's
    rate over the same round's rate with no tracer (the rounds alternate,
    so a round's setups share the machine's state)."""
    none = rates["no tracer"]
    base = statistics.median(none)
    lines = ["%-26s %14s %10s %16s" % ("setup", "exits/s", "vs none",
                                       "rounds: min-max")]
    for name, values in rates.items():
        rate = statistics.median(values)
        per_round = [v / n for v, n in zip(values, none)]
        lines.append("%-26s %14.0f %10.3f %16s" % (
            name, rate, rate / base,
            "%.3f-%.3f" % (min(per_round), max(per_round))))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lab", choices=("amd", "intel"), default="amd",
                   help="amd: QEMU's emulator, SVM (default); intel: "
                        "Bochs, VMX")
    p.add_argument("--inside", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inside:
        run = inside_intel if args.lab == "intel" else inside
        return run(args.seconds, args.rounds, args.inside)
    sys.path.insert(0, LAB)
    from core import lab_of
    out = tempfile.mkdtemp(prefix="kvmexit-overhead-")
    rc, output = lab_of(args.lab).run(
        [PYTHON, os.path.abspath(__file__), "--seconds", str(args.seconds),
         "--rounds", str(args.rounds), "--lab", args.lab, "--inside", out],
        timeout=3600, outdir=out, quiet=True)
    if rc != 0:
        raise SystemExit("overhead: the lab run failed (%d):\n%s"
                         % (rc, output[-3000:]))
    with open(os.path.join(out, "overhead.json")) as f:
        rates = json.load(f)
    guest = "loop of 10 CR4 round trips + OUT" if args.lab == "amd" else \
        "CPUID loop"
    print("Guest exit rate, %s lab, one vCPU (%s), %d rounds of ~%g s "
          "(median):" % (args.lab.upper() if args.lab == "amd" else "Intel",
                         guest, args.rounds, args.seconds))
    print(table(rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
