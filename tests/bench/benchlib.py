# SPDX-License-Identifier: Apache-2.0
"""Shared pieces of kvmexit's benchmarks (tests/bench/*.py).

Each benchmark is a script run as root under /usr/bin/python3 (the Python
that has bcc), e.g. `/usr/bin/python3 tests/bench/report_time.py`.  No
real VM exit is needed: programs are driven with BPF_PROG_TEST_RUN from
threads pinned to CPUs (tests/helpers/bpfrun.py), in the raw-old probe
mode where ctx->args are (exit_reason, vcpu, isa).
"""

import atexit
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
sys.path[:0] = [ROOT, TESTS]

from helpers import bpfrun, kvmexit  # noqa: E402

BCC026_TOOL = "/usr/sbin/kvmexit-bpfcc"
ISA_SVM = kvmexit.ISA_SVM


def need_root():
    if os.geteuid() != 0:
        sys.exit("%s: must be run as root (it loads BPF programs)"
                 % os.path.basename(sys.argv[0]))


def import_bcc():
    """bcc (and numpy), as kvmexit imports them at its start, before
    tracing: so the report's time does not include importing them."""
    try:
        kvmexit.check_bcc()
        kvmexit.check_kernel_headers()
        bcc = kvmexit.bcc
    except kvmexit.Error as e:
        sys.exit("kvmexit: %s" % e)
    return bcc


def cost_bench_start(parser, rounds):
    """The cost benches' start: `parser` (with the bench's own options)
    gets --runs and --rounds, then root and bcc are checked.  Returns the
    arguments, bcc and the CPU the probes are fired on (the first online)."""
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=rounds)
    args = parser.parse_args()
    need_root()
    return args, import_bcc(), online_cpus()[0]


def ncpus():
    """Per-CPU values come for every possible CPU."""
    return kvmexit.possible_cpus()


def online_cpus():
    return kvmexit.cpu_list(kvmexit.ONLINE_CPUS)


# What kvmexit.py's main() always adds to the kvm_exit program.
DEFAULT_FEATURES = frozenset({"growth"})


def program(layout, max_threads=kvmexit.MIN_MAX_THREADS, features=(),
            selection=None):
    """kvmexit's program in the raw-old mode."""
    return kvmexit.Program(kvmexit.Probe("raw-old", "bench"),
                           selection or kvmexit.Selection("all threads",
                                                          "all"),
                           max_threads, layout, features)


def load_ours(bcc, max_threads, layout=kvmexit.SVM_LAYOUT,
              selection=None, features=()):
    """kvmexit's program in the raw-old mode, loaded but not attached:
    (BPF object, program fd)."""
    b = kvmexit.load_program(program(layout, max_threads, features,
                                     selection=selection))
    fd = b.load_func(b"raw_kvm_exit", bcc.BPF.RAW_TRACEPOINT).fd
    return b, fd


def kvmexit_at(ref):
    """kvmexit.py as it is at git `ref`, imported from a copy of that
    commit's kvmexit.py and bpf/ (so it compiles its own BPF C)."""
    where = tempfile.mkdtemp(prefix="kvmexit-at-")
    atexit.register(shutil.rmtree, where, True)
    tree = subprocess.run(["git", "-C", ROOT, "archive", ref, "kvmexit.py",
                           "bpf"], stdout=subprocess.PIPE, check=True).stdout
    subprocess.run(["tar", "-x", "-C", where], input=tree, check=True)
    spec = importlib.util.spec_from_file_location(
        "kvmexit_at_%s" % re.sub(r"\W", "_", ref),
        os.path.join(where, "kvmexit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_ours_at(module, bcc, max_threads, tgid=None):
    """load_ours() with the kvmexit module of kvmexit_at(): its program in
    the raw-old mode, SVM layout, all threads or (tgid) one process, with
    the DEFAULT_FEATURES it has.
    Older commits took the options as load_program()'s arguments, newer
    ones as a Program."""
    probe = module.Probe("raw-old", "bench")
    selection = module.Selection("PID %d" % tgid, "pid", tgid=tgid) \
        if tgid else module.Selection("all threads", "all")
    layout = module.SVM_LAYOUT
    if hasattr(module, "Program"):
        # With what that commit's main() always added (growth, once it
        # existed), as load_ours() does with DEFAULT_FEATURES.
        known = {feature.name for feature in getattr(module, "FEATURES", ())}
        b = module.load_program(module.Program(
            probe, selection, max_threads, layout,
            frozenset(DEFAULT_FEATURES & known)))
    else:
        b = module.load_program(probe, selection, max_threads, layout)
    return b, b.load_func(b"raw_kvm_exit", bcc.BPF.RAW_TRACEPOINT).fd


def bcc026_text():
    """The BPF C text of Debian's bcc 0.26 kvmexit, read from the installed
    tool at run time (it is not part of this repository)."""
    try:
        with open(BCC026_TOOL) as f:
            source = f.read()
    except OSError as e:
        sys.exit("cannot read %s (%s): apt-get install bpfcc-tools"
                 % (BCC026_TOOL, e))
    match = re.search(r'bpf_text\s*=\s*"""(.*?)"""', source, re.S)
    if not match:
        sys.exit("no bpf_text in %s" % BCC026_TOOL)
    return match.group(1)


def reason_num(text):
    return int(re.search(r"#define REASON_NUM (\d+)", text).group(1))


def load_bcc026(bcc, thread_filter="0", reasons=None):
    """bcc 0.26's program as a raw tracepoint program that reads the exit
    reason from args[0] (its RAW_TRACEPOINT_PROBE variant), as a plain
    function so that bcc does not attach it; optionally with another
    REASON_NUM (upstream's AMD support sizes it 1028).
    Returns (BPF object, program fd, REASON_NUM)."""
    text = bcc026_text()
    if reasons is not None:
        text = re.sub(r"#define REASON_NUM \d+",
                      "#define REASON_NUM %d" % reasons, text)
    text = text.replace("FUNC_ENTRY",
                        "int raw_fn(struct bpf_raw_tracepoint_args *ctx)")
    text = text.replace("GET_ER", "ctx->args[0]")
    text = text.replace("THREAD_FILTER", thread_filter)
    b = bcc.BPF(text=text)
    fd = b.load_func(b"raw_fn", bcc.BPF.RAW_TRACEPOINT).fd
    return b, fd, reason_num(text)


EMPTY_TEXT = """
int empty_fn(struct bpf_raw_tracepoint_args *ctx)
{
    return 0;
}
"""


def load_empty(bcc):
    b = bcc.BPF(text=EMPTY_TEXT)
    return b, b.load_func(b"empty_fn", bcc.BPF.RAW_TRACEPOINT).fd


class Threads:
    """n live threads, each pinned where its jobs say: distinct TIDs, so
    distinct pid_tgid keys in the maps.  They stay alive until stop(), so
    that no TID is reused meanwhile."""

    def __init__(self):
        self.threads = []

    def grow(self, n):
        while len(self.threads) < n:
            self.threads.append(bpfrun.PinnedThread())
        return self.threads[:n]

    def stop(self):
        for t in self.threads:
            t.stop()
        self.threads = []


def fire(thread, prog_fd, events):
    """Run events [(cpu, code, isa, times)] in `thread` in this order."""
    def job():
        for cpu, code, isa, times in events:
            os.sched_setaffinity(0, {cpu})
            for _ in range(times):
                bpfrun.test_run(prog_fd, [code, 0, isa])
    thread.call(job)


def in_new_thread(fn):
    """fn() in a short-lived thread (its own TID), result returned."""
    result = {}
    t = threading.Thread(target=lambda: result.update(v=fn()))
    t.start()
    t.join()
    return result["v"]


def best_of(n, fn):
    """(the shortest of n timed calls of fn, the last call's result)."""
    best, result = None, None
    for _ in range(n):
        t = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, result


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%.0f %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1024.0


def table(headers, rows, out=sys.stdout):
    """Print rows as an aligned text table."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)
    out.flush()


class BpfStats:
    """kernel.bpf_stats_enabled=1 for the duration, restored after."""
    PATH = "/proc/sys/kernel/bpf_stats_enabled"

    def __enter__(self):
        with open(self.PATH) as f:
            self.saved = f.read().strip()
        with open(self.PATH, "w") as f:
            f.write("1")
        return self

    def __exit__(self, *exc):
        with open(self.PATH, "w") as f:
            f.write(self.saved)


class FakeMaps:
    """Stands for the BPF object in a model: b[name] is the name, a str,
    which model_maps' read_percpu() tells the tables apart by."""

    def __getitem__(self, name):
        return name.decode() if isinstance(name, bytes) else name


def model_table(ncpus, nthreads, layout, tgid=4242):
    """A model's thread table: nthreads threads of one process, each with
    its header (SVM, vCPU id = its index) on every CPU (which touches every
    page) and no counts yet.  (pid_tgid keys, uint64 [thread][cpu][word])."""
    import numpy as np
    values = np.zeros((nthreads, ncpus, layout.words), dtype=np.uint64)
    keys = [(tgid << 32) | (100000 + t) for t in range(nthreads)]
    values[:, :, 0] = ((np.uint64(kvmexit.ISA_SVM) << np.uint64(32)) |
                       np.arange(nthreads, dtype=np.uint64))[:, None]
    return keys, values


def slot_of(layout, code):
    """The thread table's slot of an exit code (direct, or a high one)."""
    return layout.direct + code - kvmexit.HIGH_BASE \
        if code >= kvmexit.HIGH_BASE else code


def model_maps(cache, raw_keys, values):
    """Make kvmexit read synthetic tables: the cache slots and the thread
    table given, every other table empty (names as FakeMaps gives them)."""
    import numpy as np

    def read_percpu(table, key_size, words, ncpus, keys=None):
        if table == "pcpu_cache":
            return keys, cache
        if table == "pcpu_kvm_stat":
            return raw_keys, values
        keys = keys or []
        return keys, np.zeros((len(keys), ncpus, words), dtype=np.uint64)

    kvmexit.read_percpu = read_percpu


def model_in_child(script, ncpus, nthreads):
    """Run `script --model-child NCPUS NTHREADS` (a model of a big host, in
    its own process so that its peak memory is its own); the dict of
    results it printed."""
    import ast
    import subprocess
    out = subprocess.run([sys.executable, script, "--model-child",
                          str(ncpus), str(nthreads)],
                         stdout=subprocess.PIPE, text=True, check=True)
    return {k: ast.literal_eval(v) for k, v in (kv.split("=", 1)
                                                for kv in out.stdout.split())}


def model_bench_main(doc, real_maps, modeled, model):
    """The command line of a benchmark on real maps, then on a model of a
    640-CPU host: real_maps(bcc) and modeled() print their tables and say
    whether their targets were met; model(ncpus, nthreads) is the model's
    child process, whose results go to its parent as k=v words."""
    import argparse
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--model-child", nargs=2, type=int,
                        help=argparse.SUPPRESS)
    parser.add_argument("--no-model", action="store_true",
                        help="skip the 640-CPU model")
    parser.add_argument("--no-real", action="store_true",
                        help="skip the real maps (the model only)")
    parser.add_argument("--model-runs", type=int, default=1, metavar="N",
                        help="run the model N times, each in a new process "
                        "(default 1)")
    args = parser.parse_args()
    if args.model_child:
        r = model(*args.model_child)
        print(" ".join("%s=%r" % kv for kv in sorted(r.items())))
        return 0
    need_root()
    ok = args.no_real or real_maps(import_bcc())
    if not args.no_model:
        ok = model_runs(modeled, args.model_runs) and ok
    return 0 if ok else 1


def model_runs(modeled, runs):
    """modeled() `runs` times (each returns whether its target was met and
    its figure, seconds); with more than one, the figures' median and
    spread.  Whether every run met the target."""
    results = [modeled() for _ in range(runs)]
    if runs > 1:
        figures = sorted(s for _, s in results)
        print()
        print("model, %d runs: %s s; median %.2f s, spread %.2f..%.2f s; "
              "target met in %d of %d runs"
              % (runs, " ".join("%.2f" % s for _, s in results),
                 figures[runs // 2] if runs % 2 else
                 (figures[runs // 2 - 1] + figures[runs // 2]) / 2,
                 figures[0], figures[-1], sum(met for met, _ in results),
                 runs))
    return all(met for met, _ in results)
