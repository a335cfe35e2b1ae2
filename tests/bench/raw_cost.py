#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Where the raw tracepoint path's cost per exit goes, part by part.

    /usr/bin/python3 tests/bench/raw_cost.py [--rounds 200]   (as root)

kvmexit's raw program on Linux 5.x+ (raw-new) gets a `struct kvm_vcpu *`
and reads the exit code from the vendor module's structures with
bpf_probe_read_kernel: on SVM twice, chained (vcpu_svm.vmcb, then
vmcb->control.exit_code), on VMX once (vcpu_vmx.exit_reason).  Each
part is measured here on its own, with BPF_PROG_TEST_RUN from a thread
pinned to one CPU and the kernel's run-time accounting
(kernel.bpf_stats_enabled=1, restored afterwards):

  empty          int fn(ctx) { return 0; } -- running any program with
                 this accounting on; subtracted from the others
  1 read         one bpf_probe_read_kernel of a u32 at ctx->args[0] + 8
  2 reads        a pointer at ctx->args[0], then a u32 at pointer + 8
                 (SVM's vmcb pointer, then its exit code)
  kvmexit raw-old   bpf/kvmexit.bpf.c where the reason comes in
                 ctx->args[0]: counting alone, no read (hit path)
  kvmexit raw-new VMX / SVM   the same program reading the reason as on
                 5.x+ kernels: one read (VMX), two chained reads (SVM)

The reads need real kernel memory that holds a pointer to itself: a BPF
array element, which a setup program fills with its own address (root
may store pointers in maps).  The raw-new programs are built with offsets
pointing into that element (vcpu_svm.vmcb at 0, exit code at 8), so they
run exactly the instructions of the real ones.  Exit code 30 (VMX
IO_INSTRUCTION, a direct slot).  Each round measures every program one
after the other; the table gives medians over the rounds of ns per event
minus that round's empty program.
"""

import argparse
import statistics
import sys

import benchlib
from benchlib import bpfrun, kvmexit

EVENTS = 1000           # per program and round
CODE = 30
CPU = 0

MICRO_TEXT = """
struct fake_vcpu {
    u64 self;           // what the first of two chained reads finds
    u32 code;           // at +8: what the last read finds
    u32 vcpu_id;
};

BPF_ARRAY(fake, struct fake_vcpu, 1);

int setup_fn(struct bpf_raw_tracepoint_args *ctx)
{
    int zero = 0;
    struct fake_vcpu *v = fake.lookup(&zero);

    if (!v)
        return 0;
    v->self = (u64)v;
    v->code = %(code)d;
    v->vcpu_id = 0;
    return 0;
}

int empty_fn(struct bpf_raw_tracepoint_args *ctx)
{
    return 0;
}

int one_read(struct bpf_raw_tracepoint_args *ctx)
{
    u32 code = 0;

    bpf_probe_read_kernel(&code, sizeof(code), (void *)ctx->args[0] + 8);
    return code;
}

int two_reads(struct bpf_raw_tracepoint_args *ctx)
{
    void *p = 0;
    u32 code = 0;

    if (bpf_probe_read_kernel(&p, sizeof(p), (void *)ctx->args[0]))
        return 0;
    bpf_probe_read_kernel(&code, sizeof(code), p + 8);
    return code;
}
""" % {"code": CODE}

# kvmexit's raw-new program with offsets into struct fake_vcpu.
RAW_NEW_SVM = {"SVM_VCPU_OFF": 0, "SVM_VMCB_OFF": 0,
               "VMCB_EXIT_CODE_OFF": 8, "KVM_VCPU_ID_OFF": 12}
RAW_NEW_VMX = {"VMX_VCPU_OFF": 0, "VMX_EXIT_REASON_OFF": 8,
               "KVM_VCPU_ID_OFF": 12}


def load_kvmexit(bcc, kind, offsets, layout):
    probe = kvmexit.Probe(kind, "bench", offsets)
    b = kvmexit.load_program(kvmexit.Program(
        probe, kvmexit.Selection("all threads", "all"),
        kvmexit.MIN_MAX_THREADS, layout))
    return b, b.load_func(b"raw_kvm_exit", bcc.BPF.RAW_TRACEPOINT).fd


def per_event(thread, fd, args, n):
    """ns per run of `fd` over n runs with ctx->args = args."""
    def job():
        for _ in range(n):
            bpfrun.test_run(fd, args)
    thread.call(lambda: bpfrun.test_run(fd, args))     # warm: cache slot
    t0, c0 = bpfrun.run_stats(fd)
    thread.call(job)
    t1, c1 = bpfrun.run_stats(fd)
    return (t1 - t0) / (c1 - c0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args()
    benchlib.need_root()
    bcc = benchlib.import_bcc()
    cpu = benchlib.online_cpus()[0]

    micro = bcc.BPF(text=MICRO_TEXT)
    fds = {name: micro.load_func(name.encode(), bcc.BPF.RAW_TRACEPOINT).fd
           for name in ("setup_fn", "empty_fn", "one_read", "two_reads")}
    bpfrun.test_run(fds["setup_fn"], [0])
    addr = micro["fake"][micro["fake"].Key(0)].self
    assert bpfrun.test_run(fds["one_read"], [addr]) == CODE
    assert bpfrun.test_run(fds["two_reads"], [addr]) == CODE

    loaded = [micro]
    old_b, old = load_kvmexit(bcc, "raw-old", {}, kvmexit.SVM_LAYOUT)
    svm_b, svm = load_kvmexit(bcc, "raw-new", RAW_NEW_SVM,
                              kvmexit.SVM_LAYOUT)
    vmx_b, vmx = load_kvmexit(bcc, "raw-new", RAW_NEW_VMX,
                              kvmexit.VMX_LAYOUT)
    loaded += [old_b, svm_b, vmx_b]
    isa_vmx, isa_svm = kvmexit.ISA_VMX, kvmexit.ISA_SVM
    # name: (fd, ctx->args)
    programs = {
        "empty": (fds["empty_fn"], [addr]),
        "1 read": (fds["one_read"], [addr]),
        "2 reads": (fds["two_reads"], [addr]),
        "kvmexit raw-old (no read)": (old, [CODE, addr, isa_svm]),
        "kvmexit raw-new VMX (1 read)": (vmx, [addr, isa_vmx]),
        "kvmexit raw-new SVM (2 reads)": (svm, [addr, isa_svm]),
    }
    samples = {name: [] for name in programs}
    thread = bpfrun.PinnedThread()
    try:
        thread.call(lambda: __import__("os").sched_setaffinity(0, {cpu}))
        with benchlib.BpfStats():
            for n in range(args.rounds):
                names = list(programs)
                # Rotate the order, so that drifts hit every program alike.
                names = names[n % len(names):] + names[:n % len(names)]
                for name in names:
                    fd, ctx = programs[name]
                    samples[name].append(per_event(thread, fd, ctx, EVENTS))
        # The counts must be exact, or the benchmark measured something
        # else: kvmexit counted every run in the slot of CODE.
        check_counted(svm_b, kvmexit.SVM_LAYOUT, args.rounds)
    finally:
        thread.stop()
        for b in loaded:
            b.cleanup()

    empties = samples["empty"]
    rows = []
    for name, values in samples.items():
        if name == "empty":
            rows.append((name, "%.1f" % statistics.median(values), ""))
            continue
        net = [v - e for v, e in zip(values, empties)]
        rows.append((name, "%.1f" % statistics.median(values),
                     "%.1f" % statistics.median(net)))
    print("Raw tracepoint program parts, ns per event (BPF_PROG_TEST_RUN, "
          "CPU %d, %d rounds x %d events, medians; net = minus the empty "
          "program of the same round)" % (cpu, args.rounds, EVENTS))
    benchlib.table(("program", "ns/event", "net"), rows)
    med = {name: statistics.median([v - e for v, e in
                                     zip(samples[name], empties)])
           for name in samples}
    print("one bpf_probe_read_kernel: %.1f ns; the second, chained: %.1f ns;"
          " counting (raw-old): %.1f ns; raw-new SVM - raw-old: %.1f ns"
          % (med["1 read"], med["2 reads"] - med["1 read"],
             med["kvmexit raw-old (no read)"],
             med["kvmexit raw-new SVM (2 reads)"] -
             med["kvmexit raw-old (no read)"]))
    return 0


def check_counted(b, layout, rounds):
    """Every run of the SVM raw-new program counted once under CODE."""
    # One thread on one CPU: never evicted, all its counts are in that
    # CPU's cache slot.
    cache = b["pcpu_cache"]
    total = sum(v.counts.slot[CODE] for v in cache[cache.Key(0)])
    expected = rounds * (EVENTS + 1)
    if total != expected:
        sys.exit("raw_cost: kvmexit counted %d exits, not %d" %
                 (total, expected))


if __name__ == "__main__":
    sys.exit(main())
