#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""What kvmexit costs on arm64: per event in the kernel, and as the guest
sees it.  Runs in the arm64 lab (Debian's 6.1 arm64 kernel under QEMU's
emulator), as root:

    tests/lab/run --lab arm64 -- /usr/bin/python3 tests/bench/arm64_cost.py \\
        [--runs 3] [--rounds 50] [--guest-runs 3] [--exits 5000]

1. Per event, with kernel.bpf_stats_enabled=1 (restored afterwards):
   run_time_ns / run_cnt of each program over BPF_PROG_TEST_RUN runs from
   one thread pinned to one CPU (tests/helpers/bpfrun.py), against an
   empty raw tracepoint program measured right before it each round.
   Paths:
     exit            the default program (raw-arm64, raw_kvm_exit) on a
                     SYS64 trap, args (ret TRAP, esr_ec 0x18): the hit path
     exit --detail   the --detail program's kvm_exit (test_arm64_exit:
                     the exit remembered, then counted)
     sysreg event    --detail's kvm_handle_sys_reg program under that exit
                     (test_kvm_handle_sys_reg: the sub-key counted)
   The programs are loaded once (a compile takes minutes under the
   emulator); a run's row: medians over its rounds of ns per event of the
   empty program and of each path's, the extra ns, and path/empty.
2. As the guest sees it: one arm64_guest.py vCPU making --exits HVCs
   (PSCI_VERSION, answered in the kernel) under `kvmexit` and under
   `kvmexit --detail` (each started once, attached to all threads, for
   --guest-runs guest runs), and with no tracer before, between and
   after; exits per second of the vCPU's own run time, and each run's
   rate / the median rate with no tracer: its median and spread.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile

import benchlib
from benchlib import bpfrun, kvmexit

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
GUEST = os.path.join(REPO, "tests", "lab", "arm64_guest.py")
PYTHON = "/usr/bin/python3"
EVENTS = 500                # per path and round
TRAP, SYS64 = kvmexit.ARM64_EXCEPTION_TRAP, 0x18
ESR_MRS = 0x62300169        # mrs x11, ID_AA64PFR0_EL1
PSCI_VERSION = 0x84000000


def arm64_program(features=(), cls=kvmexit.Program):
    return cls(kvmexit.Probe("raw-arm64", "bench", kvm="arm64"),
               kvmexit.Selection("all threads", "all"),
               kvmexit.MIN_MAX_THREADS, kvmexit.ARM64.layout,
               frozenset(features))


def load(bcc, program, names):
    b = kvmexit.load_program(program)
    return b, [b.load_func(n, bcc.BPF.RAW_TRACEPOINT).fd for n in names]


def per_event(thread, cpu, fd, args, n):
    def job():
        os.sched_setaffinity(0, {cpu})
        for _ in range(n):
            bpfrun.test_run(fd, args)
    t0, c0 = bpfrun.run_stats(fd)
    thread.call(job)
    t1, c1 = bpfrun.run_stats(fd)
    return (t1 - t0) / (c1 - c0)


def kernel_cost(bcc, cpu, runs, rounds):
    """Programs loaded once (each compile takes minutes under the
    emulator); `runs` runs of `rounds` rounds."""
    empty_b, empty = benchlib.load_empty(bcc)
    plain_b, (plain,) = load(bcc, arm64_program(), [b"raw_kvm_exit"])
    detail_b, (exit_fd, sysreg_fd) = load(
        bcc, arm64_program({"detail"}, bpfrun.TestEntries),
        [b"test_arm64_exit", b"test_kvm_handle_sys_reg"])
    paths = [("exit", plain, [TRAP, SYS64, 0]),
             ("exit --detail", exit_fd, [SYS64]),
             ("sysreg event", sysreg_fd, [ESR_MRS])]
    thread = bpfrun.PinnedThread()
    results = []
    try:
        with benchlib.BpfStats():
            # The thread's exit first: it holds the cache and exit slots.
            for _, fd, args in paths:
                per_event(thread, cpu, fd, args, 1)
            per_event(thread, cpu, exit_fd, [SYS64], 1)
            for _ in range(runs):
                samples = {path: [] for path, _, _ in paths}
                for _ in range(rounds):
                    for path, fd, args in paths:
                        e = per_event(thread, cpu, empty, [0], EVENTS)
                        samples[path].append(
                            (e, per_event(thread, cpu, fd, args, EVENTS)))
                results.append({
                    path: (statistics.median(e for e, _ in s),
                           statistics.median(p for _, p in s))
                    for path, s in samples.items()})
    finally:
        thread.stop()
        for b in (empty_b, plain_b, detail_b):
            b.cleanup()
    print("Per event in the arm64 lab's kernel (BPF_PROG_TEST_RUN, CPU %d, "
          "%d runs x %d rounds x %d events; medians over a run's rounds, "
          "ns per event)" % (cpu, runs, rounds, EVENTS))
    rows = []
    for path in results[0]:
        for n, r in enumerate(results):
            e, p = r[path]
            rows.append((path, n + 1, "%.0f" % e, "%.0f" % p,
                         "%.0f" % (p - e), "%.2f" % (p / e)))
    benchlib.table(("path", "run", "empty", "program", "extra",
                    "program/empty"), rows)
    print()
    for path in results[0]:
        ratios = [r[path][1] / r[path][0] for r in results]
        extra = [r[path][1] - r[path][0] for r in results]
        print("%-14s program/empty median %.2f (runs %.2f..%.2f), extra "
              "%.0f ns (%.0f..%.0f)" % (path, statistics.median(ratios),
                                        min(ratios), max(ratios),
                                        statistics.median(extra),
                                        min(extra), max(extra)))
    print(flush=True)


def guest_rate(exits):
    """Exits per second of one vCPU's run making `exits` HVCs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "report.json")
        subprocess.run([PYTHON, GUEST, "--do", "hvc:%#x:%d" % (
            PSCI_VERSION, exits), "--report", path],
            stdout=subprocess.DEVNULL, check=True)
        with open(path) as f:
            report = json.load(f)
    return exits / report["vcpus"][0]["seconds"]


def start_tracer(args):
    proc = subprocess.Popen([PYTHON, "kvmexit.py"] + args, cwd=REPO,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if not line.startswith("Display kvm exit reasons"):
        proc.kill()
        sys.exit("arm64_cost: kvmexit %s did not start: %s%s" % (
            " ".join(args), line, proc.stderr.read()))
    return proc


def guest_cost(runs, exits):
    """Each tracer started once (a compile of minutes under the
    emulator), the guest run `runs` times under it; runs with no tracer
    before, between and after."""
    rates = {"none": []}
    rates["none"].append(guest_rate(exits))
    for name, args in (("kvmexit", ["--json"]),
                       ("kvmexit --detail", ["--detail", "--json"])):
        proc = start_tracer(args)
        try:
            rates[name] = [guest_rate(exits) for _ in range(runs)]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(120)
        rates["none"] += [guest_rate(exits) for _ in range(runs // 2 + 1)]
    base = statistics.median(rates["none"])
    print("As the guest sees it: HVC exits per second of one vCPU (%d "
          "HVCs a run); rate / the median rate with no tracer" % exits)
    rows = []
    for name, r in rates.items():
        ratio = [x / base for x in r]
        rows.append((name, " ".join("%.0f" % x for x in r),
                     "%.0f" % statistics.median(r),
                     "%.3f" % statistics.median(ratio),
                     "%.3f..%.3f" % (min(ratio), max(ratio))))
    benchlib.table(("tracer", "runs (exits/s)", "median", "ratio (median)",
                    "spread (per run)"), rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--guest-runs", type=int, default=3)
    p.add_argument("--exits", type=int, default=5000)
    args, bcc, cpu = benchlib.cost_bench_start(p, 50)
    kernel_cost(bcc, cpu, args.runs, args.rounds)
    guest_cost(args.guest_runs, args.exits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
