#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
#
# kvmexit  Count KVM VM exits per exit reason, per vCPU thread.
#          For Linux, uses BCC, eBPF.
#
# USAGE: kvmexit [-h] [-p PID [-v VCPU | -a]] [-t TID | -T 'TID1,TID2']
#                [duration]
#
# Attaches to the kvm:kvm_exit tracepoint (raw where it yields the exit
# reason, regular otherwise), counts exits in the kernel per thread and exit
# reason, and prints the counts after `duration` seconds or on Ctrl-C, or
# with --prometheus serves them on /metrics until SIGTERM.
# The in-kernel half is bpf/kvmexit.bpf.c.  See kvmexit(8).
#
# Contents, in order; each part builds on those above it:
#   numbers shared with the C (passed as -D)   arguments
#   which threads to trace (/proc)             what the running kernel offers
#   BTF                                        the ISAs: one Isa entry each
#   which probe                                tables of counts
#   exit handling times (--latency)            --detail's sub-keys
#   the program: a MapSpec per map, a Feature per option that adds to
#     it, and Program, the configuration built once from the options
#   BPF program: compile, load, attach         privileges (capabilities)
#   reading the maps (Snapshot)                threads that have exited:
#     their tables, the VM names, the Ledger   report (text, JSON, CSV)
#   --prometheus, its self-metrics and         main
#     --web.config.file (TLS, basic auth)

# Ctrl-C while the modules load ends the script quietly, as later on.
try:
    import argparse
    import array
    import base64
    import bisect
    import collections
    import concurrent.futures
    import csv
    import ctypes
    import errno
    import gzip
    import hmac
    import io
    import itertools
    import json
    import operator
    import os
    import re
    import signal
    import socket
    import struct
    import sys
    import tempfile
    import threading
    import time
    import urllib.parse

    # bcc and numpy are imported once, here; a missing or broken one is
    # told in one line by main(), not as a traceback at import time.  Any
    # exception counts: a broken install raises more than ImportError.
    try:
        import bcc
        from bcc.libbcc import lib as libbcc
        import numpy as np
        MISSING = None
    except Exception as e:          # OSError: libbcc.so cannot load
        np = bcc = libbcc = None
        MISSING = e
    # prometheus_client, ssl, yaml and bcrypt: only for --prometheus, so
    # imported there (import_prometheus_client, load_web_config).
    prometheus_client = None
except KeyboardInterrupt:
    raise SystemExit(130)

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
BTF_DIR = "/sys/kernel/btf"
POSSIBLE_CPUS = "/sys/devices/system/cpu/possible"
ONLINE_CPUS = "/sys/devices/system/cpu/online"

#
# Numbers shared with the C
#
# Numbers that this script and bpf/kvmexit.bpf.c must agree on.  They are
# defined here only and handed to the C as -DNAME=VALUE (shared_macros()).
ISA_VMX, ISA_SVM = 1, 2                 # kvm_exit's isa argument
# arm64's kvm_exit has no isa argument: kvmexit gives its exits this code,
# far from the kernel's small KVM_ISA_* numbers (and within the 8 bits
# --detail keeps of an isa).
ISA_ARM64 = 0x64
# arm64's exit codes (see ARM64 below): a trap counts as its ESR exception
# class (6 bits), any other exit as ARM64_NON_TRAP_BASE + ret.  ret's bit
# 31 only says an SError was pending (ARM_EXCEPTION_CODE masks it).
ARM64_EXCEPTION_TRAP = 2
ARM64_NON_TRAP_BASE = 64
ARM64_SERROR_PENDING = 1 << 31
VCPU_ID_UNKNOWN = 0xffffffff            # the probe cannot see vCPU ids
HIGH_BASE = 0x400                       # first SVM code of the high slots
# The latency histogram (see latency_bucket()): LAT_SUB buckets per power
# of two, times up to 2^LAT_MAX_LOG2 ns (about 69 s).
LAT_SUB_BITS = 3
LAT_SUB = 1 << LAT_SUB_BITS
LAT_MAX_LOG2 = 36
LAT_BUCKETS = (LAT_MAX_LOG2 - LAT_SUB_BITS + 1) * LAT_SUB
# Why an exit could not be counted: the C macro of its pcpu_lost index, and
# what the warning after the report says.
LOST = (
    ("LOST_THREAD_TABLE_FULL",
     "the thread table was full (raise --max-threads)"),
    ("LOST_RARE_TABLE_FULL", "the table of rare exit codes was full"),
    ("LOST_REASON_UNREADABLE", "their exit reason could not be read"),
    ("LOST_LATENCY_TABLE_FULL",
     "the latency table was full (their counts are kept)"),
    ("LOST_WRITE_BACK_FAILED",
     "a thread's counts could not be written back to the thread table "
     "(a bug in kvmexit: please report it)"),
)
LOST_REASONS = tuple(why for _, why in LOST)
# Room in the kernel's tables besides the thread table (--max-threads):
# rare exit codes, --detail's sub-keys, and --latency's entries per thread.
MAX_RARE = 1024
# The thread table grows while tracing (--max-threads is its first size):
# up to GENERATIONS tables, each twice the size of the one before.  New
# threads enter the oldest with room; the newest is kept free, for the
# threads that come within a TICK: once one enters it, the next is added
# (README, "A table that grows").
GENERATIONS = 8
MAX_DETAIL = 16384
LATENCY_PER_THREAD = 8
# --detail's sub-key kinds: name: number in struct detail_key's kind
# (-DDETAIL_<NAME>).
DETAIL_KINDS = {"port": 1, "msr": 2, "page": 3, "mmio": 4, "vector": 5,
                "cr": 6, "hypercall": 7, "user": 8,
                # arm64's: WFI/WFE, HVC's SMCCC function, trapped system
                # register, guest abort's IPA.
                "wfx": 9, "smccc": 10, "sysreg": 11, "ipa": 12}
# MMIO access types beyond kvm_mmio's 0..2 (unsatisfied read, read, write):
# a write KVM completed on its fast MMIO bus (ioeventfd).
MMIO_FAST_WRITE = 3


def shared_macros():
    values = {"ISA_VMX": ISA_VMX, "ISA_SVM": ISA_SVM, "ISA_ARM64": ISA_ARM64,
              "ARM64_EXCEPTION_TRAP": ARM64_EXCEPTION_TRAP,
              "ARM64_NON_TRAP_BASE": ARM64_NON_TRAP_BASE,
              "ARM64_SERROR_PENDING": ARM64_SERROR_PENDING,
              "VCPU_ID_UNKNOWN": VCPU_ID_UNKNOWN, "HIGH_BASE": HIGH_BASE,
              "LAT_SUB_BITS": LAT_SUB_BITS, "LAT_SUB": LAT_SUB,
              "LAT_MAX_LOG2": LAT_MAX_LOG2, "LAT_BUCKETS": LAT_BUCKETS,
              "NR_LOST": len(LOST), "MMIO_FAST_WRITE": MMIO_FAST_WRITE}
    values.update((macro, i) for i, (macro, _) in enumerate(LOST))
    return ["-D%s=%d" % item for item in values.items()]


MIN_MAX_THREADS = 1024

# QEMU names its vCPU threads "CPU <index>/KVM".
QEMU_VCPU_COMM = re.compile(r"CPU (\d+)/KVM")
KVM_VCPU_FD = re.compile(r"anon_inode:kvm-vcpu:(\d+)")


class Error(Exception):
    """A problem to report as one 'kvmexit: ...' line, without traceback."""


class OutputError(Error):
    """The report could not be written: a closed pipe, a full disk."""


def emit(text, stream=None):
    """Write and flush at once, so a reader sees each report whole."""
    stream = stream or sys.stdout
    try:
        stream.write(text)
        stream.flush()
    except OSError as e:
        raise OutputError("cannot write the report to %s: %s" % (
            "stderr" if stream is sys.stderr else "stdout",
            e.strerror or e))


#
# Arguments
#
examples = """examples:
    ./kvmexit                     # all threads, until Ctrl-C
    ./kvmexit 6                   # all threads, for 6 seconds
    ./kvmexit -p 1273795 5        # PID 1273795, its threads collapsed
    ./kvmexit -p 1273795 5 -a     # PID 1273795, per thread
    ./kvmexit -p 1273795 -v 0     # PID 1273795, vCPU 0 only
    ./kvmexit -p 1273795 -v 0 4   # PID 1273795, vCPU 0, for 4 seconds
    ./kvmexit -t 1273819 10       # TID 1273819 only, for 10 seconds
    ./kvmexit -T '1273820,1273819'  # these two threads, until Ctrl-C
"""


# Bounds of numeric options.  Seconds: what a timed wait can take (Python's
# clocks stop near 2^63 ns); threads: a BPF map's max_entries is a u32, and
# the memory check (check_table_memory) refuses what the host cannot hold.
MAX_SECONDS = 10 ** 9
MAX_U32 = 2 ** 32 - 1
DEFAULT_KEEP_GONE = 300     # --keep-gone's default, in seconds
# Options that shape a printed report, which --prometheus does not print:
# (argparse dest, how the user spells it).
REPORT_OPTIONS = (("duration", "the duration"), ("interval", "-i"),
                  ("count", "-c"), ("cumulative", "--cumulative"),
                  ("timestamp", "--timestamp"), ("json", "--json"),
                  ("csv", "--csv"), ("show_vcpu", "--show-vcpu"),
                  ("comm", "--comm"), ("top", "--top"), ("alltids", "-a"))


def bounded_int(low, high, what):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError("must be %s: %r" % (what, text))
        if value > high:
            raise argparse.ArgumentTypeError("must be at most %d: %r"
                                             % (high, text))
        return value
    return parse


positive_int = bounded_int(1, MAX_U32, "a positive integer")
non_negative_int = bounded_int(0, MAX_U32, "a non-negative integer")
seconds = bounded_int(1, MAX_SECONDS, "a positive integer")


def tid_list(text):
    try:
        tids = [int(item) for item in text.split(",")
                if item.strip().isdecimal()]
    except ValueError:
        tids = []
    if len(tids) != len(text.split(",")) or not all(
            0 < tid <= MAX_U32 for tid in tids):
        raise argparse.ArgumentTypeError(
            "must be comma-separated positive integers: %r" % text)
    return tids


# The labels a series of --prometheus can keep, in their order; `reason` is
# always kept.  What a series drops is summed over (README, "Series a fleet
# can afford"): kvm_exits_total keeps all by default, the latency
# histogram (18 series each) only the reason, so that 200 VMs x 8 vCPUs x
# 30 reasons stay under 50,000 series.
SERIES_LABELS = ("vm", "pid", "vcpu", "isa", "reason")
DEFAULT_LABELS = SERIES_LABELS
DEFAULT_LATENCY_LABELS = ("isa", "reason")


def label_list(text):
    """'vm,vcpu' -> ('vm', 'vcpu', 'reason'): in SERIES_LABELS' order."""
    chosen = {item.strip() for item in text.split(",")} - {""}
    unknown = chosen - set(SERIES_LABELS)
    if unknown:
        raise argparse.ArgumentTypeError(
            "must be comma-separated labels of %s: %r"
            % (", ".join(SERIES_LABELS), text))
    return tuple(label for label in SERIES_LABELS
                 if label in chosen or label == "reason")


VERSION = "1.0.0"           # setup.cfg's; a test keeps them equal


# Options of --prometheus only: (argparse dest, how the user spells it).
PROMETHEUS_OPTIONS = (("keep_gone", "--keep-gone"), ("labels", "--labels"),
                      ("latency_labels", "--latency-labels"),
                      ("web_config", "--web.config.file"),
                      ("web_max_requests", "--web.max-requests"))


DEFAULT_MAX_REQUESTS = 40       # node_exporter's --web.max-requests


def listen_address(text):
    """[ADDR:]PORT -> (host, port); ADDR is 127.0.0.1 unless given, an
    IPv6 one in brackets ([::1]:9417)."""
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    # An IPv6 ADDR is bracketed; unbracketed, its colons would make the
    # split above ambiguous ("::1:9417").
    if "[" in host or "]" in host or (":" in host and not bracketed):
        raise argparse.ArgumentTypeError(
            "must be [ADDR:]PORT, an IPv6 ADDR in brackets ([::1]:9417): "
            "%r" % text)
    if not port.isdecimal() or not 0 < int(port) < 65536 or \
            (sep and not host):
        raise argparse.ArgumentTypeError(
            "must be [ADDR:]PORT, PORT from 1 to 65535: %r" % text)
    return (host if sep else "127.0.0.1"), int(port)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="kvmexit",
        usage="%(prog)s [-h] [-p PID [-v VCPU | -a]] [-t TID | -T "
              "'TID1,TID2'] [options] [duration]",
        description="Display kvm exit reasons and their counts per thread",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples)
    parser.add_argument("duration", nargs="?", type=seconds,
                        help="trace for this many seconds (default: until "
                             "Ctrl-C)")
    parser.add_argument("-p", "--pid", type=positive_int,
                        help="trace this PID only, its threads collapsed")
    pid_view = parser.add_mutually_exclusive_group()
    pid_view.add_argument("-v", "--vcpu", type=non_negative_int,
                          help="with -p: trace this vCPU only")
    pid_view.add_argument("-a", "--alltids", action="store_true",
                          help="with -p: show each thread of the PID")
    threads = parser.add_mutually_exclusive_group()
    threads.add_argument("-t", "--tid", type=positive_int,
                         help="trace this TID only")
    threads.add_argument("-T", "--tids", type=tid_list,
                         help="trace these comma-separated TIDs")
    parser.add_argument("--probe", choices=("auto", "raw", "tracepoint"),
                        default="auto",
                        help="which kvm_exit probe to use (default: auto)")
    parser.add_argument("--max-threads", type=positive_int,
                        help="room for this many threads in the kernel "
                             "(default: 2 x the vCPUs present, at least %d)"
                             % MIN_MAX_THREADS)
    parser.add_argument("-i", "--interval", type=seconds,
                        help="print a report every INTERVAL seconds")
    parser.add_argument("-c", "--count", type=positive_int,
                        help="with -i: stop after COUNT reports")
    parser.add_argument("--cumulative", action="store_true",
                        help="with -i: counts since tracing began, not per "
                             "interval")
    parser.add_argument("--timestamp", action="store_true",
                        help="print the time before each report")
    machine = parser.add_mutually_exclusive_group()
    machine.add_argument("--json", action="store_true",
                         help="one JSON object per report (see kvmexit(8))")
    machine.add_argument("--csv", action="store_true",
                         help="CSV rows, one per thread and reason")
    parser.add_argument("--latency", action="store_true",
                        help="also time each exit until its vCPU re-enters "
                             "the guest: average, p50, p90, p99 and "
                             "maximum")
    parser.add_argument("--detail", action="store_true",
                        help="under each reason, what caused it: port, MSR, "
                             "page, MMIO address, vector, CR, hypercall, "
                             "and the returns to user space (uses the "
                             "regular tracepoint)")
    parser.add_argument("--show-vcpu", action="store_true",
                        help="add a VCPU column (the kernel's vCPU id)")
    parser.add_argument("--comm", action="store_true",
                        help="show the process name (and QEMU's guest "
                             "name)")
    parser.add_argument("--top", type=positive_int, metavar="N",
                        help="show at most N reasons per thread (per "
                             "report in views that collapse threads)")
    parser.add_argument("-m", "--max-parallelism", type=positive_int,
                        metavar="N",
                        help="accepted for scripts written for bcc's "
                             "kvmexit; no effect: the report is read in one "
                             "pass")
    parser.add_argument("--prometheus", type=listen_address,
                        metavar="[ADDR:]PORT",
                        help="serve the counts on http://ADDR:PORT/metrics "
                             "for Prometheus until SIGTERM (ADDR: 127.0.0.1 "
                             "unless given); prints no report")
    parser.add_argument("--keep-gone", type=seconds, metavar="SECS",
                        help="with --prometheus: keep serving the counts of "
                             "a VM that has ended for SECS seconds (default: "
                             "%d)" % DEFAULT_KEEP_GONE)
    parser.add_argument("--labels", type=label_list, metavar="LIST",
                        help="with --prometheus: the labels kvm_exits_total "
                             "keeps, of %s; the others are summed over "
                             "(reason is always kept; default: all)"
                             % ",".join(SERIES_LABELS))
    parser.add_argument("--latency-labels", type=label_list, metavar="LIST",
                        help="with --prometheus --latency: the labels the "
                             "histogram keeps, as --labels (default: %s)"
                             % ",".join(DEFAULT_LATENCY_LABELS))
    parser.add_argument("--web.config.file", dest="web_config",
                        metavar="FILE",
                        help="with --prometheus: TLS and basic auth, in the "
                             "web configuration format of Prometheus' "
                             "exporters (see kvmexit(8))")
    parser.add_argument("--web.max-requests", dest="web_max_requests",
                        type=non_negative_int, metavar="N",
                        help="with --prometheus: answer 503 beyond N "
                             "requests at once; 0: no limit (default: %d)"
                             % DEFAULT_MAX_REQUESTS)
    parser.add_argument("--version", action="version",
                        version="kvmexit " + VERSION)
    parser.add_argument("-d", "--debug", action="store_true",
                        help="say which probe was chosen and why, where "
                             "--prometheus listens, and show the compiler's "
                             "messages")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.vcpu is not None or args.alltids) and args.pid is None:
        parser.error("-v and -a need -p PID")
    if args.interval and args.duration:
        parser.error("use -c COUNT with -i, not a duration")
    if (args.count or args.cumulative) and not args.interval:
        parser.error("-c and --cumulative need -i INTERVAL")
    if args.prometheus:
        for dest, spelling in REPORT_OPTIONS:
            if getattr(args, dest):
                parser.error("--prometheus prints no report: drop %s"
                             % spelling)
    else:
        for dest, spelling in PROMETHEUS_OPTIONS:
            if getattr(args, dest) is not None:
                parser.error("%s needs --prometheus" % spelling)
    if args.latency_labels is not None and not args.latency:
        parser.error("--latency-labels needs --latency")
    if args.web_max_requests is None:
        args.web_max_requests = DEFAULT_MAX_REQUESTS
    args.labels = args.labels or DEFAULT_LABELS
    args.latency_labels = args.latency_labels or DEFAULT_LATENCY_LABELS
    return args


#
# Which threads to trace: validated against /proc before anything loads.
#
class Column:
    """One id column of the text report: its header and its cells share
    one width, bcc's '%-8u ' for ids."""

    def __init__(self, name, cell, width=8):
        self.name, self.cell, self.width = name, cell, width

    def header(self):
        return "%-*s " % (self.width, self.name)

    def text(self, value):
        return "%-*s " % (self.width, value)


class Selection:
    """The threads asked for, and the view they are shown in.

    The view decides everything that differs between bcc's reports: which
    threads the kernel counts (kernel_filter), how rows are grouped
    (group), which id columns come first (columns), and whether a vCPU is
    picked by the kernel's vCPU id rather than by its thread (keep)."""

    VIEWS = ("all", "pid", "alltids", "vcpu", "tid", "tids")
    # Views that show one block of rows for all the threads they count.
    COLLAPSED = ("pid", "vcpu", "tid")

    def __init__(self, context, view, tgid=None, tids=None, vcpu=None):
        assert view in self.VIEWS, view
        self.context = context
        self.view = view
        self.tgid = tgid
        self.tids = tids
        self.vcpu = vcpu

    @property
    def collapsed(self):
        return self.view in self.COLLAPSED

    @property
    def by_vcpu_id(self):
        """A vCPU of a VMM that does not name its threads like QEMU: all of
        the process is counted, and the report keeps that vCPU's rows."""
        return self.view == "vcpu" and self.tids is None

    # Longer TID lists go to a bitmap: a chain of 12,500 comparisons crashed
    # clang, and a chain costs ~2 ns less per exit than the bitmap's lookup
    # (tests/bench/filter_cost.py), so short lists keep it.
    CHAIN_MAX_TIDS = 4096

    def kernel_filter(self):
        """The C macros of the in-kernel filter, from integers only (the
        TIDs of a bitmap are set after loading, by fill_tid_filter)."""
        if self.tids is not None and len(self.tids) > self.CHAIN_MAX_TIDS:
            return ["-DFILTER_TIDS"]
        if self.tids is not None:
            return ["-DFILTER_TID_NOT_IN(tid)=(%s)" % " && ".join(
                "(tid) != %d" % int(t) for t in self.tids)]
        if self.tgid is not None:
            return ["-DFILTER_TGID=%d" % int(self.tgid)]
        return []

    def group(self, tgid, tid):
        """What one block of rows is for: a thread (PID, TID), a TID, or
        None where the view collapses threads."""
        if self.collapsed:
            return None
        return (tgid, tid) if self.view == "all" else (tid,)

    def keep(self, table, vcpu_ids):
        """A {(tgid, tid, ...): value} table limited to the rows shown."""
        if self.by_vcpu_id:
            return {k: v for k, v in table.items()
                    if vcpu_ids.get(k[:2]) == self.vcpu}
        return table

    def columns(self, comm=False, show_vcpu=False):
        """The id columns before the reason, each with how its cell is
        found from (report, tgid, tid)."""
        if self.collapsed:
            return []
        vcpu = Column("VCPU", lambda rep, tgid, tid: rep.vcpu_cell(tgid, tid))
        if self.view == "all":
            cols = [Column("PID", lambda rep, tgid, tid: tgid)]
            if comm:
                cols.append(Column("COMM", lambda rep, tgid, tid:
                                   rep.comm(tgid), width=32))
            cols.append(Column("TID", lambda rep, tgid, tid: tid))
        else:
            cols = [Column("TID" if self.view == "alltids" else "TIDS",
                           lambda rep, tgid, tid: tid)]
        return cols + ([vcpu] if show_vcpu else [])

    def processes(self, tgid_of_tid):
        """The processes the first line names (none for all threads)."""
        if self.view == "all":
            return []
        return sorted({self.tgid} if self.tgid else
                      {tgid_of_tid(t) for t in self.tids or ()} - {None})


def read_text(path):
    """A /proc or /sys file as text.  Names there are bytes chosen by any
    process (comm, cmdline): what is not UTF-8 is kept as \\xNN."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "backslashreplace")


def printable(name):
    """A name for one line of a report: control characters as escapes."""
    return "".join(c if c.isprintable() else
                   "\\x%02x" % ord(c) if ord(c) < 0x100 else
                   "\\u%04x" % ord(c) for c in name)


def tgid_of(tid, proc="/proc"):
    """The process a thread belongs to, or None if there is no such one."""
    try:
        status = read_text("%s/%d/status" % (proc, tid))
    except OSError:
        return None
    match = re.search(r"^Tgid:\s*(\d+)", status, re.M)
    return int(match.group(1)) if match else None


def process_start(pid, proc="/proc"):
    """When the process started (clock ticks after boot: /proc's stat field
    22), None if it is gone: with the PID, it names one process."""
    try:
        stat = read_text("%s/%d/stat" % (proc, pid))
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def thread_names(pid, proc="/proc"):
    """{tid: comm} for the threads of a process."""
    names = {}
    task = "%s/%d/task" % (proc, pid)
    try:
        entries = os.listdir(task)
    except OSError:
        return names            # the process exited meanwhile
    for entry in entries:
        try:
            names[int(entry)] = read_text("%s/%s/comm" % (task, entry))
        except (OSError, ValueError):
            continue            # the thread exited meanwhile
    return names


def vcpu_thread(pid, vcpu, proc="/proc"):
    """The TID of QEMU's thread 'CPU <vcpu>/KVM' in a process, or None.

    The whole name must match: 'CPU 1' is not 'CPU 10/KVM'."""
    for tid, comm in sorted(thread_names(pid, proc).items()):
        match = QEMU_VCPU_COMM.fullmatch(comm.rstrip("\n"))
        if match and int(match.group(1)) == vcpu:
            return tid
    return None


def vcpu_fds(pid, proc="/proc"):
    """The vCPU ids a process holds KVM file descriptors for, any VMM."""
    ids = set()
    fd_dir = "%s/%d/fd" % (proc, pid)
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return ids
    for fd in fds:
        try:
            match = KVM_VCPU_FD.fullmatch(os.readlink("%s/%s" % (fd_dir, fd)))
        except OSError:
            continue
        if match:
            ids.add(int(match.group(1)))
    return ids


def select_threads(args, proc="/proc"):
    if args.pid is not None and tgid_of(args.pid, proc) != args.pid:
        raise Error("no such process: PID %d" % args.pid)
    if args.pid is not None and (args.tid or args.tids):
        if args.vcpu is not None or args.alltids:
            raise Error("-v and -a cannot be combined with -t or -T")
    for tid in ([args.tid] if args.tid else args.tids or []):
        tgid = tgid_of(tid, proc)
        if tgid is None:
            raise Error("no such thread: TID %d" % tid)
        if args.pid is not None and tgid != args.pid:
            raise Error("TID %d is not a thread of PID %d" % (tid, args.pid))

    if args.tid is not None:
        return Selection("TID %d" % args.tid, "tid", tids=[args.tid])
    if args.tids is not None:
        return Selection("TIDS %s" % [str(t) for t in args.tids], "tids",
                         tids=args.tids)
    if args.pid is None:
        return Selection("all threads", "all")
    if args.vcpu is not None:
        context = "PID %d VCPU %d" % (args.pid, args.vcpu)
        tid = vcpu_thread(args.pid, args.vcpu, proc)
        if tid is not None:
            return Selection(context, "vcpu", tids=[tid], vcpu=args.vcpu)
        if args.vcpu in vcpu_fds(args.pid, proc):
            # Not QEMU: pick the vCPU by the id the kernel reports.
            return Selection(context, "vcpu", tgid=args.pid, vcpu=args.vcpu)
        raise Error("PID %d has no vCPU %d" % (args.pid, args.vcpu))
    if args.alltids:
        return Selection("PID %d and its all threads" % args.pid, "alltids",
                         tgid=args.pid)
    return Selection("PID %d" % args.pid, "pid", tgid=args.pid)


def vmm_processes(proc="/proc"):
    """{pid: number of vCPUs} of the processes that hold vCPUs now."""
    vmms = {}
    for entry in os.listdir(proc):
        if entry.isdigit():
            vcpus = len(vcpu_fds(int(entry), proc))
            if vcpus:
                vmms[int(entry)] = vcpus
    return vmms


#
# What the running kernel offers
#
# Linux numbers CPUs below NR_CPUS, at most 8192: a list that goes past
# this is not the kernel's (and would cost the report its memory).
CPU_LIMIT = 1 << 16
CPU_RANGE = re.compile(r"(\d+)(?:-(\d+))?\Z", re.ASCII)


def parse_cpu_list(text):
    """'0-3,8-11' (the kernel's CPU list format) -> [0, 1, 2, 3, 8, ...]."""
    cpus = []
    for part in text.strip().split(","):
        match = CPU_RANGE.match(part)
        first = match and int(match.group(1))
        last = match and int(match.group(2) or first)
        if not match or not first <= last < CPU_LIMIT:
            raise Error("not a list of CPUs: %r" % text.strip()[:80])
        cpus.extend(range(first, last + 1))
    return cpus


def cpu_list(path):
    """The CPUs a /sys list names (possible, online)."""
    try:
        return parse_cpu_list(read_text(path))
    except Error as e:
        raise Error("%s: %s" % (path, e))


def possible_cpus():
    """Per-CPU map values come for every possible CPU, online or not."""
    return len(cpu_list(POSSIBLE_CPUS))


def tracepoint_dir():
    for tracefs in TRACEFS_DIRS:
        path = tracefs + "/events/kvm/kvm_exit"
        if os.path.exists(path + "/format"):
            return path
    return None


def format_fields(fmt):
    """The field names of a tracepoint's format file."""
    return set(re.findall(r"^\s*field:[^;]*?(\w+)(?:\[\d*\])?;", fmt,
                          re.MULTILINE))


# kvm_exit's fields, per kind of KVM: x86's tell VMX from SVM per exit.
EXIT_FIELDS = (("x86", ("exit_reason", "isa")), ("arm64", ("ret", "esr_ec")))


def check_exit_fields(tp_dir):
    """Which kind of KVM this is, "x86" or "arm64", from the fields of
    kvm_exit that the counts come from."""
    fields = format_fields(read_text(tp_dir + "/format"))
    for kind, needed in EXIT_FIELDS:
        if set(needed) <= fields:
            return kind
    raise Error("kvm:kvm_exit has neither exit_reason and isa (x86) nor ret "
                "and esr_ec (arm64) fields (%s)"
                % ", ".join(sorted(f for f in fields
                                   if not f.startswith("common_"))))


# A number in a print fmt as the kernel writes it: decimal, or hex after
# 0x (int(text, 0) would also take octal and refuse a leading zero).
FMT_NUMBER = r"-?(?:0[xX][0-9a-fA-F]+|[0-9]+)"


def fmt_number(text):
    hexa = text.lstrip("-")[:2] in ("0x", "0X")
    return int(text, 16 if hexa else 10)


def parse_format_names(fmt):
    """Exit reason names the kernel's kvm_exit print fmt knows.

    Returns ({code: name} for VMX, {code: name} for SVM); the fmt lists
    the VMX names first, then the SVM ones."""
    tables = ({}, {})
    # Each table ends where the VMX flags (__print_flags) begin.
    symbolic = [part.split("__print_flags(")[0]
                for part in fmt.split("__print_symbolic(")[1:3]]
    for table, text in zip(tables, symbolic):
        for code, plus, name in re.findall(
                r'\{\s*(' + FMT_NUMBER + r')(?:\s*\+\s*(\d+))?\s*,'
                r'\s*"([^"]*)"\s*\}', text):
            value = (fmt_number(code) + int(plus or 0)) & 0xffffffff
            table[value] = re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")
    return tables


def parse_arm64_format_names(fmt):
    """arm64 exit names the kernel's kvm_exit print fmt knows, as {code:
    name} in ARM64's codes: its table for REC->ret (the kinds of exit) and
    the one for REC->esr_ec (the ESR exception classes of traps)."""
    names = {}
    for part in fmt.split("__print_symbolic(")[1:]:
        field = re.match(r"\s*REC->(\w+)\s*,", part)
        base = {"ret": ARM64_NON_TRAP_BASE, "esr_ec": 0}.get(
            field and field.group(1))
        if base is None:
            continue
        for code, name in re.findall(
                r'\{\s*\(?\s*(' + FMT_NUMBER + r')\s*\)?\s*,'
                r'\s*"([^"]*)"\s*\}', part):
            code = fmt_number(code)
            # A trap counts as its class, so ret's TRAP names no code.
            if base and code == ARM64_EXCEPTION_TRAP:
                continue
            names[base + code] = re.sub(r"[^A-Za-z0-9]+", "_", name)
    return names


def check_kernel_headers(release=None, modules="/lib/modules"):
    """bcc compiles against the running kernel's headers.  kvmexit does not
    put them in place itself (that is the install step's job, and
    /lib/modules may be read-only); it says what is missing."""
    release = release or os.uname().release
    build = "%s/%s/build" % (modules, release)
    if os.path.isdir(build) or os.environ.get("BCC_KERNEL_SOURCE") or \
            os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return
    if os.path.islink(build):
        raise Error("no kernel headers for %s: %s is a dangling link to %s;"
                    " reinstall its headers package" % (
                        release, build, os.readlink(build)))
    raise Error("no kernel headers for %s: install linux-headers-%s, or link"
                " a matching headers tree to %s (.ci/install does that with"
                " Debian's linux-headers-amd64)" % (release, release, build))


#
# BTF: where the raw tracepoint finds the exit reason
#
BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_ARRAY, BTF_KIND_STRUCT = 1, 2, 3, 4
BTF_KIND_UNION, BTF_KIND_ENUM, BTF_KIND_FWD, BTF_KIND_TYPEDEF = 5, 6, 7, 8
BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT = 9, 10, 11
BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO, BTF_KIND_VAR = 12, 13, 14
BTF_KIND_DATASEC, BTF_KIND_FLOAT, BTF_KIND_DECL_TAG = 15, 16, 17
BTF_KIND_TYPE_TAG, BTF_KIND_ENUM64 = 18, 19
# Bytes that follow a type's 12-byte header: fixed, or per vlen item;
# indexed by kind, so that the walk over every type is a list lookup.
BTF_EXTRA = {BTF_KIND_INT: (4, 0), BTF_KIND_ARRAY: (12, 0),
             BTF_KIND_STRUCT: (0, 12), BTF_KIND_UNION: (0, 12),
             BTF_KIND_ENUM: (0, 8), BTF_KIND_FUNC_PROTO: (0, 8),
             BTF_KIND_VAR: (4, 0), BTF_KIND_DATASEC: (0, 12),
             BTF_KIND_DECL_TAG: (4, 0), BTF_KIND_ENUM64: (0, 12)}
BTF_FIXED = [BTF_EXTRA.get(kind, (0, 0))[0] for kind in range(32)]
BTF_PER_ITEM = [BTF_EXTRA.get(kind, (0, 0))[1] for kind in range(32)]
# Type id 0, which no record describes.
BTF_VOID = (0, 0, 0, b"", 0, 0, 0)
BTF_MODIFIERS = (BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST,
                 BTF_KIND_RESTRICT, BTF_KIND_TYPE_TAG)


class Btf:
    """Just enough of a BTF reader to find struct member offsets.

    A module's BTF is split: its type ids and string offsets continue
    those of vmlinux, its base.  Reading a file only notes where each type
    starts (vmlinux has about 125,000, and under the labs' emulator every
    Python step counts); a type is decoded when asked for."""

    def __init__(self, data, base=None):
        magic, _, _, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from("<HBBIIIII", data)
        if magic != 0xeb9f:
            raise ValueError("not little-endian BTF")
        self.data = data
        self.base = base
        self.first_id = base.count if base else 1     # id 0 is void
        self.strings = (base.strings if base else b"") + \
            data[hdr_len + str_off:hdr_len + str_off + str_len]
        self.starts = array.array("q")
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        self.types_at = pos, end
        info_of, add = struct.Struct("<I").unpack_from, self.starts.append
        fixed, per_item = BTF_FIXED, BTF_PER_ITEM
        while pos < end:
            add(pos)
            info, = info_of(data, pos + 4)
            kind = (info >> 24) & 0x1f
            pos += 12 + fixed[kind] + per_item[kind] * (info & 0xffff)
        if pos != end:
            raise ValueError("BTF types overrun their section")
        self.count = self.first_id + len(self.starts)

    def header(self, type_id):
        """(kind, name offset, size or type, data, body offset, vlen,
        kind_flag) of a type; the base's own for its ids."""
        if type_id < self.first_id:
            return self.base.header(type_id) if self.base else BTF_VOID
        pos = self.starts[type_id - self.first_id]
        name_off, info, size_or_type = struct.unpack_from("<III", self.data,
                                                          pos)
        return ((info >> 24) & 0x1f, name_off, size_or_type, self.data,
                pos + 12, info & 0xffff, info >> 31)

    def named(self, kind, name):
        """The id of the first struct or typedef of that name, or None.
        Strings are deduplicated in BTF, so a name has one offset, and the
        type is found by searching for it where types start."""
        offset = self.strings.find(b"\0" + name.encode() + b"\0")
        return None if offset < 0 else self.with_name(kind, offset + 1)

    def with_name(self, kind, name_off):
        # A base type's name is among the base's strings.
        if self.base and name_off < len(self.base.strings):
            found = self.base.with_name(kind, name_off)
            if found:
                return found
        # Every type starts on a 4-byte boundary of the type section.
        needle = struct.pack("<I", name_off)
        first, end = self.types_at
        pos = self.data.find(needle, first, end)
        while pos >= 0:
            if (pos - first) % 4 == 0:
                i = bisect.bisect_left(self.starts, pos)
                if i < len(self.starts) and self.starts[i] == pos and \
                        self.header(self.first_id + i)[0] == kind:
                    return self.first_id + i
            pos = self.data.find(needle, pos + 1, end)
        return None

    def string(self, offset):
        end = self.strings.index(b"\0", offset)
        return self.strings[offset:end].decode()

    def members(self, type_id):
        """[(name, type id, bit offset, bit-field size)] of a struct or
        union; the parameter type ids of a function prototype."""
        kind, _, _, data, body, vlen, kflag = self.header(type_id)
        if kind == BTF_KIND_FUNC_PROTO:
            return [struct.unpack_from("<II", data, body + 8 * i)[1]
                    for i in range(vlen)]
        members = []
        for i in range(vlen):
            name, m_type, offset = struct.unpack_from("<III", data,
                                                      body + 12 * i)
            members.append((self.string(name), m_type,
                            offset & 0xffffff if kflag else offset,
                            kflag and offset >> 24))
        return members

    def resolve(self, type_id):
        """Skip typedefs and qualifiers."""
        kind, _, target = self.header(type_id)[:3]
        while kind in BTF_MODIFIERS:
            type_id = target
            kind, _, target = self.header(type_id)[:3]
        return type_id

    def member(self, type_id, name):
        """(byte offset, type id) of a member, looking into anonymous
        structs and unions; None if absent or a bit-field."""
        type_id = self.resolve(type_id)
        if self.header(type_id)[0] not in (BTF_KIND_STRUCT, BTF_KIND_UNION):
            return None
        for m_name, m_type, bits, bitfield in self.members(type_id):
            if m_name == name:
                if bitfield or bits % 8:
                    return None
                return bits // 8, m_type
            if not m_name:
                found = self.member(m_type, name)
                if found:
                    return bits // 8 + found[0], found[1]
        return None

    def offset(self, struct_name, path):
        """Byte offset of a member path like 'control.exit_code'."""
        type_id = self.named(BTF_KIND_STRUCT, struct_name)
        if type_id is None:
            return None
        total = 0
        for name in path.split("."):
            found = self.member(type_id, name)
            if found is None:
                return None
            total, type_id = total + found[0], found[1]
        return total

    def pointee(self, struct_name, member):
        """The name of the struct a pointer member points to."""
        type_id = self.named(BTF_KIND_STRUCT, struct_name)
        found = type_id and self.member(type_id, member)
        if not found:
            return None
        ptr = self.header(self.resolve(found[1]))
        if ptr[0] != BTF_KIND_PTR:
            return None
        return self.string(self.header(self.resolve(ptr[2]))[1])

    def tracepoint_params(self, name):
        """Parameter count of a tracepoint's btf_trace_<name> prototype,
        without the leading void *ctx."""
        type_id = self.named(BTF_KIND_TYPEDEF, "btf_trace_" + name)
        if type_id is None:
            return None
        ptr = self.header(self.resolve(type_id))
        proto = self.resolve(ptr[2])
        if self.header(proto)[0] != BTF_KIND_FUNC_PROTO:
            return None
        return len(self.members(proto)) - 1


# Each BTF file is read once while the program is built (main() then
# empties the cache): the probe's choice and the task offsets both need
# vmlinux's (about 125,000 types: 25 ms here, about 3 s under the labs'
# emulator).  Keyed by the file's identity and the base object, so that a
# file written again is read again.
BTF_CACHE = {}


def read_btf(path, base):
    try:
        with open(path, "rb") as f:
            return Btf(f.read(), base)
    except (OSError, ValueError, IndexError, struct.error):
        return None             # unreadable, truncated or not BTF: no raw


def load_btf(name, base=None, btf_dir=BTF_DIR):
    path = "%s/%s" % (btf_dir, name)
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, base)
    if key not in BTF_CACHE:
        BTF_CACHE[key] = read_btf(path, base)
    return BTF_CACHE[key]


#
# The ISAs: all that differs between VMX and SVM, one table each
#
# Exit reason names, from the kernel's uapi asm/vmx.h (EXIT_REASON_*) and
# asm/svm.h (SVM_EXIT_*) without their prefixes.  Codes the running kernel
# knows beyond these are added from the tracepoint's format at run time.
VMX_REASONS = {
    0: "EXCEPTION_NMI", 1: "EXTERNAL_INTERRUPT", 2: "TRIPLE_FAULT",
    3: "INIT_SIGNAL", 4: "SIPI_SIGNAL", 7: "INTERRUPT_WINDOW",
    8: "NMI_WINDOW", 9: "TASK_SWITCH", 10: "CPUID", 12: "HLT", 13: "INVD",
    14: "INVLPG", 15: "RDPMC", 16: "RDTSC", 18: "VMCALL", 19: "VMCLEAR",
    20: "VMLAUNCH", 21: "VMPTRLD", 22: "VMPTRST", 23: "VMREAD",
    24: "VMRESUME", 25: "VMWRITE", 26: "VMOFF", 27: "VMON",
    28: "CR_ACCESS", 29: "DR_ACCESS", 30: "IO_INSTRUCTION", 31: "MSR_READ",
    32: "MSR_WRITE", 33: "INVALID_STATE", 34: "MSR_LOAD_FAIL",
    36: "MWAIT_INSTRUCTION", 37: "MONITOR_TRAP_FLAG",
    39: "MONITOR_INSTRUCTION", 40: "PAUSE_INSTRUCTION",
    41: "MCE_DURING_VMENTRY", 43: "TPR_BELOW_THRESHOLD", 44: "APIC_ACCESS",
    45: "EOI_INDUCED", 46: "GDTR_IDTR", 47: "LDTR_TR", 48: "EPT_VIOLATION",
    49: "EPT_MISCONFIG", 50: "INVEPT", 51: "RDTSCP", 52: "PREEMPTION_TIMER",
    53: "INVVPID", 54: "WBINVD", 55: "XSETBV", 56: "APIC_WRITE",
    57: "RDRAND", 58: "INVPCID", 59: "VMFUNC", 60: "ENCLS", 61: "RDSEED",
    62: "PML_FULL", 63: "XSAVES", 64: "XRSTORS", 67: "UMWAIT", 68: "TPAUSE",
    74: "BUS_LOCK", 75: "NOTIFY",
}
VMX_FAILED_VMENTRY = 0x80000000

SVM_EXCP_BASE, SVM_EXCP_END = 0x40, 0x60    # SVM's exception exits
SVM_EXCEPTIONS = {
    0: "DE", 1: "DB", 2: "NMI", 3: "BP", 4: "OF", 5: "BR", 6: "UD", 7: "NM",
    8: "DF", 9: "OLD_MF", 10: "TS", 11: "NP", 12: "SS", 13: "GP", 14: "PF",
    16: "MF", 17: "AC", 18: "MC", 19: "XM", 20: "VE", 21: "CP", 28: "HV",
    29: "VC", 30: "SX",
}
SVM_REASONS = {
    **{cr: "READ_CR%d" % cr for cr in (0, 2, 3, 4, 8)},
    **{0x10 + cr: "WRITE_CR%d" % cr for cr in (0, 2, 3, 4, 8)},
    **{0x20 + dr: "READ_DR%d" % dr for dr in range(8)},
    **{0x30 + dr: "WRITE_DR%d" % dr for dr in range(8)},
    **{SVM_EXCP_BASE + v: "EXCP_" + name
       for v, name in SVM_EXCEPTIONS.items()},
    0x60: "INTR", 0x61: "NMI", 0x62: "SMI", 0x63: "INIT", 0x64: "VINTR",
    0x65: "CR0_SEL_WRITE", 0x66: "IDTR_READ", 0x67: "GDTR_READ",
    0x68: "LDTR_READ", 0x69: "TR_READ", 0x6a: "IDTR_WRITE",
    0x6b: "GDTR_WRITE", 0x6c: "LDTR_WRITE", 0x6d: "TR_WRITE",
    0x6e: "RDTSC", 0x6f: "RDPMC", 0x70: "PUSHF", 0x71: "POPF",
    0x72: "CPUID", 0x73: "RSM", 0x74: "IRET", 0x75: "SWINT", 0x76: "INVD",
    0x77: "PAUSE", 0x78: "HLT", 0x79: "INVLPG", 0x7a: "INVLPGA",
    0x7b: "IOIO", 0x7c: "MSR", 0x7d: "TASK_SWITCH", 0x7e: "FERR_FREEZE",
    0x7f: "SHUTDOWN", 0x80: "VMRUN", 0x81: "VMMCALL", 0x82: "VMLOAD",
    0x83: "VMSAVE", 0x84: "STGI", 0x85: "CLGI", 0x86: "SKINIT",
    0x87: "RDTSCP", 0x88: "ICEBP", 0x89: "WBINVD", 0x8a: "MONITOR",
    0x8b: "MWAIT", 0x8c: "MWAIT_COND", 0x8d: "XSETBV", 0x8e: "RDPRU",
    0x8f: "EFER_WRITE_TRAP",
    **{0x90 + cr: "CR%d_WRITE_TRAP" % cr for cr in range(16)},
    0xa2: "INVPCID", 0x400: "NPF", 0x401: "AVIC_INCOMPLETE_IPI",
    0x402: "AVIC_UNACCELERATED_ACCESS", 0x403: "VMGEXIT",
    0xffffffff: "ERR",
}

# The exit codes --detail's C tells apart, by their macro names there.
DETAIL_CODES = {
    **{"VMX_" + name: code for code, name in VMX_REASONS.items()
       if name in ("EXCEPTION_NMI", "EXTERNAL_INTERRUPT", "CR_ACCESS",
                   "IO_INSTRUCTION")},
    **{"SVM_" + name: code for code, name in SVM_REASONS.items()
       if name in ("IOIO", "NPF")},
    "SVM_EXCP_BASE": SVM_EXCP_BASE, "SVM_EXCP_END": SVM_EXCP_END,
}


class SlotLayout:
    """How exit codes map to counter slots (see slot_of() in the BPF C).

    Sized for the vendor module in use; codes beyond the layout are still
    counted exactly, in the table of rare codes."""

    def __init__(self, direct, high):
        self.direct, self.high = direct, high
        self.slots = direct + high
        self.words = 1 + self.slots       # u32 vcpu_id, u32 isa, u64 slot[]

    def code(self, slot):
        if slot < self.direct:
            return slot
        return HIGH_BASE + slot - self.direct

    def macros(self):
        return ["-DDIRECT_SLOTS=%d" % self.direct,
                "-DHIGH_SLOTS=%d" % self.high]


VMX_LAYOUT = SlotLayout(96, 0)          # VMX exit reasons 0..95
SVM_LAYOUT = SlotLayout(176, 16)        # SVM 0x000..0x0af, 0x400..0x40f


def vmx_reason_name(names, code):
    name = names.get(code & 0xffff, str(code & 0xffff))
    if code & VMX_FAILED_VMENTRY:
        name += "|FAILED_VMENTRY"
    return name


def svm_reason_name(names, code):
    return names.get(code, "0x%x" % code)


def svm_raw_reason(btf):
    """({C macro: offset}, why) of the raw probe's way to SVM's exit code,
    (None, why not), or None where the BTF has no vcpu_svm."""
    if btf.offset("vcpu_svm", "vmcb") is None:
        return None
    offsets = (btf.offset("vcpu_svm", "vcpu"), btf.offset("vcpu_svm", "vmcb"),
               btf.offset("vmcb", "control.exit_code"))
    if None in offsets or btf.pointee("vcpu_svm", "vmcb") != "vmcb":
        return None, "BTF lacks vcpu_svm.vmcb->control.exit_code"
    return dict(zip(("SVM_VCPU_OFF", "SVM_VMCB_OFF", "VMCB_EXIT_CODE_OFF"),
                    offsets)), \
        "BTF: vcpu_svm.vmcb at %d, vmcb.control.exit_code at %d" % offsets[1:]


def vmx_raw_reason(btf):
    """As svm_raw_reason(), for VMX's exit reason in vcpu_vmx."""
    if btf.offset("vcpu_vmx", "exit_reason") is None:
        return None
    # TDX vCPUs (Linux 6.16+) also exit with isa VMX, but are not
    # vcpu_vmx: where the kernel can run them, VMX offsets would read the
    # wrong memory.
    if btf.named(BTF_KIND_STRUCT, "vcpu_tdx") is not None:
        return None, "BTF has vcpu_tdx: TDX vCPUs also exit as VMX but " \
            "are not vcpu_vmx"
    offsets = (btf.offset("vcpu_vmx", "vcpu"),
               btf.offset("vcpu_vmx", "exit_reason"))
    if None in offsets:
        return None, "BTF lacks vcpu_vmx.vcpu"
    return dict(zip(("VMX_VCPU_OFF", "VMX_EXIT_REASON_OFF"), offsets)), \
        "BTF: vcpu_vmx.exit_reason at %d" % offsets[1]


# --detail's fields as each ISA has them: a port access's (size, in,
# string, rep), a page fault's (access, name), an event's kind.
def svm_port_access(attr):          # the IOIO exit information
    return {1: 1, 2: 2, 4: 4}.get(attr >> 4 & 7), attr & 1, \
        attr >> 2 & 1, attr >> 3 & 1


def vmx_port_access(attr):          # the exit qualification
    return (attr & 7) + 1, attr >> 3 & 1, attr >> 4 & 1, attr >> 5 & 1


def svm_page_access(attr):          # the NPF error code
    op = "write" if attr & 2 else "fetch" if attr & 0x10 else "read"
    # RSVD: KVM marks MMIO pages so; not present: a first touch.
    return op, "rsvd" if attr & 8 else None if attr & 1 else "not-present"


def vmx_page_access(attr):          # the EPT violation's qualification
    return "write" if attr & 2 else "fetch" if attr & 4 else "read", None


# VMX's interruption types (bits 10:8 of the interruption information).
VMX_EVENT_TYPES = {0: "external", 2: "nmi", 3: "exception",
                   4: "soft-int", 5: "priv-soft-exc", 6: "soft-exc",
                   7: "other"}


def svm_vector_kind(attr):
    return "exception"


def vmx_vector_kind(attr):
    return VMX_EVENT_TYPES.get(attr, str(attr))


# arm64: an exit's kind is kvm_exit's ret (kvm_asm.h's ARM_EXCEPTION_*,
# without the prefix), and a trap's reason its ESR exception class (esr.h's
# ESR_ELx_EC_*, without the prefix; the names kvm_arm.h gives the
# tracepoint).  Classes not allocated in the architecture have no name.
ARM64_EXCEPTIONS = {0: "IRQ", 1: "SERROR", 3: "IL", 0xbadca11: "HYP_GONE"}
ARM64_CLASSES = {
    0x00: "UNKNOWN", 0x01: "WFx", 0x03: "CP15_32", 0x04: "CP15_64",
    0x05: "CP14_MR", 0x06: "CP14_LS", 0x07: "FP_ASIMD", 0x08: "CP10_ID",
    0x09: "PAC", 0x0c: "CP14_64", 0x0d: "BTI", 0x0e: "ILL", 0x11: "SVC32",
    0x12: "HVC32", 0x13: "SMC32", 0x15: "SVC64", 0x16: "HVC64",
    0x17: "SMC64", 0x18: "SYS64", 0x19: "SVE", 0x1a: "ERET", 0x1c: "FPAC",
    0x1d: "SME", 0x1f: "IMP_DEF", 0x20: "IABT_LOW", 0x21: "IABT_CUR",
    0x22: "PC_ALIGN", 0x24: "DABT_LOW", 0x25: "DABT_CUR", 0x26: "SP_ALIGN",
    0x27: "MOPS", 0x28: "FP_EXC32", 0x2c: "FP_EXC64", 0x2d: "GCS",
    0x2f: "SERROR", 0x30: "BREAKPT_LOW", 0x31: "BREAKPT_CUR",
    0x32: "SOFTSTP_LOW", 0x33: "SOFTSTP_CUR", 0x34: "WATCHPT_LOW",
    0x35: "WATCHPT_CUR", 0x38: "BKPT32", 0x3a: "VECTOR32", 0x3c: "BRK64",
}
ARM64_REASONS = {**ARM64_CLASSES,
                 **{ARM64_NON_TRAP_BASE + ret: name
                    for ret, name in ARM64_EXCEPTIONS.items()}}


def arm64_code(ret, esr_ec):
    """The exit code kvmexit counts for kvm_exit's (ret, esr_ec): what the
    BPF C computes (arm64_code() there)."""
    ret &= ~ARM64_SERROR_PENDING & 0xffffffff
    if ret == ARM64_EXCEPTION_TRAP:
        return esr_ec
    return ARM64_NON_TRAP_BASE + ret


def arm64_reason_name(names, code):
    """Unnamed: the class of a trap, or the ret of another exit, in hex."""
    if code in names:
        return names[code]
    if code < ARM64_NON_TRAP_BASE:
        return "EC_0x%02x" % code
    return "RET_0x%x" % (code - ARM64_NON_TRAP_BASE)


# Every class (6 bits) and the kinds of exit up to IL; HYP_GONE and kinds
# beyond are rare, counted in the table of rare codes.
ARM64_LAYOUT = SlotLayout(ARM64_NON_TRAP_BASE + 4, 0)


class Isa(collections.namedtuple("Isa", (
        "code name module vcpu_struct fmt_table reasons reason_name layout "
        "raw_reason port_access page_access vector_kind"))):
    """What kvmexit knows of one ISA.  code: kvm_exit's isa argument;
    name: as reports give it; module: its KVM vendor module; vcpu_struct:
    the vendor's vCPU struct, where raw_reason(btf) finds the exit reason
    for the raw probe; fmt_table: which of kvm_exit's print fmt tables
    names its reasons; reasons: {code: name}, and reason_name(names, code)
    a code's name; layout: its counter slots; then --detail's decoders."""

    __slots__ = ()


VMX = Isa(ISA_VMX, "vmx", "kvm_intel", "vcpu_vmx", 0, VMX_REASONS,
          vmx_reason_name, VMX_LAYOUT, vmx_raw_reason, vmx_port_access,
          vmx_page_access, vmx_vector_kind)
SVM = Isa(ISA_SVM, "svm", "kvm_amd", "vcpu_svm", 1, SVM_REASONS,
          svm_reason_name, SVM_LAYOUT, svm_raw_reason, svm_port_access,
          svm_page_access, svm_vector_kind)
# arm64's KVM is built in and its raw tracepoint passes (ret, esr_ec): no
# module, no vCPU struct to read.  Its print fmt has tables of its own
# (parse_arm64_format_names()).  --detail's kinds are its own (DECODE's
# wfx, smccc, sysreg and ipa; mmio and user as on x86).
ARM64 = Isa(ISA_ARM64, "arm64", None, None, 2, ARM64_REASONS,
            arm64_reason_name, ARM64_LAYOUT, None, None, None, None)
# x86's, in the order the raw probe looks for their vCPU structs.
X86_ISAS = (SVM, VMX)
ISAS = X86_ISAS + (ARM64,)
ISA_BY_CODE = {isa.code: isa for isa in ISAS}


def slot_layout(sys_module="/sys/module"):
    """The layout of the one ISA whose module is loaded; else SVM's, the
    larger."""
    loaded = [isa for isa in X86_ISAS
              if os.path.exists("%s/%s" % (sys_module, isa.module))]
    return loaded[0].layout if len(loaded) == 1 else SVM.layout


class ReasonNames:
    """Each ISA's reason names; extras: more {code: name} per table of
    kvm_exit's print fmt (parse_format_names())."""

    def __init__(self, *extras):
        # The kernel's own names only fill gaps, so that output stays the
        # same across kernels for the codes both know.
        extras = list(extras) + [None] * len(ISAS)
        self.names = {isa.code: {**(extras[isa.fmt_table] or {}),
                                 **isa.reasons} for isa in ISAS}

    def name(self, isa, code):
        if isa not in ISA_BY_CODE:
            return str(code)
        return ISA_BY_CODE[isa].reason_name(self.names[isa], code)


def kernel_reason_names(tp_dir):
    try:
        fmt = read_text(tp_dir + "/format")
    except (OSError, TypeError):
        return ReasonNames()
    if "esr_ec;" in fmt:
        return ReasonNames(None, None, parse_arm64_format_names(fmt))
    return ReasonNames(*parse_format_names(fmt))


#
# Which probe: raw tracepoint where it yields the exit reason
#
class Probe:
    """Which kvm_exit probe, decided completely before anything loads.

    kind: "tracepoint"; "raw-old", whose args[0] is the exit reason;
    "raw-new", which reads the reason from the vendor's vCPU struct at
    `offsets` (C macro: byte offset, from BTF); or "raw-arm64", whose
    args[0] and args[1] are arm64's ret and ESR class.  A raw probe the
    kernel refuses to attach falls back to `fallback`, the tracepoint,
    which is None where the user asked for raw.  kvm: "x86" or "arm64",
    whose kvm_exit has other fields (check_exit_fields())."""

    KINDS = ("tracepoint", "raw-old", "raw-new", "raw-arm64")

    def __init__(self, kind, why, offsets=None, tp_vcpu_id=False,
                 requested="auto", fallback=None, kvm="x86"):
        assert kind in self.KINDS, kind
        self.kind, self.why, self.requested = kind, why, requested
        self.kvm = kvm
        self.offsets = dict(offsets or {})
        self.tp_vcpu_id = tp_vcpu_id        # the tracepoint has vcpu_id
        self.fallback = fallback

    @property
    def raw(self):
        return self.kind != "tracepoint"

    @property
    def sees_vcpu_ids(self):
        if self.raw:
            return "KVM_VCPU_ID_OFF" in self.offsets
        return self.tp_vcpu_id

    def macros(self):
        macros = ["-DPROBE_" + self.kind.replace("-", "_").upper()]
        macros += ["-D%s=%d" % item for item in self.offsets.items()]
        if not self.raw and self.tp_vcpu_id:
            macros.append("-DTP_HAS_VCPU_ID")
        if self.kvm == "arm64":
            macros.append("-DKVM_ARM64")
        return macros


def raw_reason_offsets(vmlinux, btf_dir=BTF_DIR, kvm=None):
    """({C macro: offset}, why) telling the raw program where the vendor
    module keeps the exit reason, or (None, why not).  kvm: the kvm
    module's BTF, if already loaded (it also holds vmlinux's types)."""
    kvm = kvm or load_btf("kvm", vmlinux, btf_dir) or vmlinux
    vcpu_id = kvm.offset("kvm_vcpu", "vcpu_id")
    common = {} if vcpu_id is None else {"KVM_VCPU_ID_OFF": vcpu_id}
    for isa in X86_ISAS:
        # The vendor code is a module on distro kernels, else built in.
        found = isa.raw_reason(load_btf(isa.module, vmlinux, btf_dir) or
                               vmlinux)
        if found is not None:
            offsets, why = found
            return (dict(offsets, **common) if offsets else None), why
    return None, "no %s in the BTF of %s or vmlinux in %s" % (
        " or ".join(isa.vcpu_struct for isa in X86_ISAS),
        ", ".join(isa.module for isa in X86_ISAS), btf_dir)


def choose_probe(requested, tp_dir, btf_dir=BTF_DIR, detail=False,
                 kvm="x86"):
    """Raw tracepoint where the kernel's BTF shows how to get the exit
    reason from it (on arm64 always: its arguments are the tracepoint's
    fields), the regular tracepoint otherwise.  --detail takes the
    tracepoint on x86: its fields hold the exit information the kernel
    read for it, which a raw probe runs too early to find."""
    tp_vcpu_id = "vcpu_id;" in read_text(tp_dir + "/format")
    tracepoint = lambda why: Probe("tracepoint", why, tp_vcpu_id=tp_vcpu_id,
                                   requested=requested, kvm=kvm)
    if requested == "tracepoint":
        return tracepoint("asked for with --probe tracepoint")
    fallback = None if requested == "raw" else tracepoint(
        "fallback, the raw tracepoint did not attach")
    if kvm == "arm64":
        # --detail too: arm64's kvm_exit holds no exit information, its
        # sub-keys all come from other events.
        return Probe("raw-arm64", "arm64: kvm_exit(ret, esr_ec, vcpu_pc) "
                     "passes the exit's kind and class", requested=requested,
                     fallback=fallback, kvm=kvm)
    if detail:
        if requested == "raw":
            raise Error("--detail reads the fields of the kvm_exit "
                        "tracepoint: use it without --probe raw")
        return tracepoint("--detail reads the tracepoint's exit information")
    vmlinux = load_btf("vmlinux", btf_dir=btf_dir)
    params = kvm = None
    if vmlinux is not None:
        # On distro kernels the prototype is in the kvm module's BTF, whose
        # lookups see vmlinux's types too.
        kvm = load_btf("kvm", vmlinux, btf_dir) or vmlinux
        params = kvm.tracepoint_params("kvm_exit")
    why = "kernel BTF has no kvm_exit prototype"
    if params == 3:
        vcpu_id = kvm.offset("kvm_vcpu", "vcpu_id")
        vcpu_id = {} if vcpu_id is None else {"KVM_VCPU_ID_OFF": vcpu_id}
        return Probe("raw-old", "kernel BTF: kvm_exit(exit_reason, vcpu, "
                     "isa) passes the exit reason", vcpu_id,
                     requested=requested, fallback=fallback)
    if params == 2:
        offsets, why = raw_reason_offsets(vmlinux, btf_dir, kvm)
        why = "kvm_exit(vcpu, isa): " + why
        if offsets:
            return Probe("raw-new", why, offsets, requested=requested,
                         fallback=fallback)
    if requested == "raw":
        raise Error("--probe raw: cannot get the exit reason from the raw "
                    "tracepoint here (%s)" % why)
    return tracepoint("fallback, " + why)


def check_vcpu_ids(selection, probe):
    if selection.by_vcpu_id and not probe.sees_vcpu_ids:
        raise Error("PID %d has no thread named 'CPU %d/KVM', and the %s "
                    "probe cannot see vCPU ids" % (selection.tgid,
                                                   selection.vcpu,
                                                   probe.kind))


#
# Tables of counts: {key: count or Latency}
#
def add_counts(table, more):
    """Add {key: count or Latency} into table."""
    for k, v in more.items():
        table[k] = table[k] + v if k in table else v


def merge_by(table, key):
    merged = {}
    for k, v in table.items():
        k = key(*k)
        merged[k] = merged[k] + v if k in merged else v
    return merged


#
# Exit handling times: a log-linear histogram, as bpf/kvmexit.bpf.c keeps it
#
PERCENTILES = (50, 90, 99)


def latency_bucket(ns):
    """The bucket of a time, as lat_bucket() in the BPF C computes it: one
    per ns below 2 * LAT_SUB, then LAT_SUB equal buckets per power of two,
    so that a bucket is at most 1/LAT_SUB of its lower bound wide."""
    if ns < 2 * LAT_SUB:
        return ns
    log2 = ns.bit_length() - 1
    if log2 >= LAT_MAX_LOG2:
        return LAT_BUCKETS - 1
    return (log2 - LAT_SUB_BITS + 1) * LAT_SUB + \
        (ns >> (log2 - LAT_SUB_BITS)) - LAT_SUB


def bucket_bounds(bucket):
    """(lowest, highest) ns a bucket holds (the last one holds more)."""
    if bucket < 2 * LAT_SUB:
        return bucket, bucket
    shift = bucket // LAT_SUB - 1
    low = (bucket % LAT_SUB + LAT_SUB) << shift
    return low, low + (1 << shift) - 1


class Latency:
    """Exit handling times of one (thread, reason): count, sum, max and a
    log-linear histogram, as bpf/kvmexit.bpf.c keeps them."""

    def __init__(self, count=0, total_ns=0, max_ns=0, hist=None):
        self.count, self.total_ns, self.max_ns = count, total_ns, max_ns
        self.hist = list(hist or [])

    def __add__(self, other):
        width = max(len(self.hist), len(other.hist))
        pad = lambda h: h if len(h) == width else h + [0] * (width - len(h))
        # map(): a scrape sums tens of thousands of these (--labels).
        return Latency(self.count + other.count,
                       self.total_ns + other.total_ns,
                       max(self.max_ns, other.max_ns),
                       list(map(operator.add, pad(self.hist),
                                pad(other.hist))))

    def since(self, earlier):
        """The times of an interval.  The maximum cannot be taken apart, so
        it stays the maximum since tracing began."""
        earlier_hist = earlier.hist + [0] * (len(self.hist) -
                                             len(earlier.hist))
        return Latency(self.count - earlier.count,
                       self.total_ns - earlier.total_ns, self.max_ns,
                       [a - b for a, b in zip(self.hist, earlier_hist)])

    def avg_ns(self):
        return self.total_ns / self.count if self.count else 0.0

    def percentile_ns(self, percent):
        """The nearest-rank percentile (the time of the ceil(percent% * n)-th
        fastest exit), as the middle of the bucket that holds it: within
        1/(2 * LAT_SUB) = 6.25% of the exact time.  Never above the
        maximum, which is exact and then closer."""
        rank = (sum(self.hist) * percent + 99) // 100
        seen = 0
        for bucket, n in enumerate(self.hist):
            seen += n
            if n and seen >= rank:
                low, high = bucket_bounds(bucket)
                return min((low + high) // 2, self.max_ns)
        return 0

    def percentiles_ns(self):
        return [self.percentile_ns(p) for p in PERCENTILES]


#
# --detail: the sub-keys behind each exit reason, as the DETAIL section of
# bpf/kvmexit.bpf.c counts them
#
DETAIL_KIND_NAMES = {n: k for k, n in DETAIL_KINDS.items()}

# Well-known MSRs (Intel SDM vol. 4, AMD APM vol. 2, KVM's and Hyper-V's
# paravirtual ones), to name the MSR behind MSR exits.
MSR_NAMES = {
    0x10: "IA32_TSC", 0x11: "KVM_WALL_CLOCK", 0x12: "KVM_SYSTEM_TIME",
    0x1b: "IA32_APIC_BASE", 0x3a: "IA32_FEATURE_CONTROL",
    0x3b: "IA32_TSC_ADJUST", 0x48: "IA32_SPEC_CTRL", 0x49: "IA32_PRED_CMD",
    0x8b: "IA32_BIOS_SIGN_ID", 0xe7: "IA32_MPERF", 0xe8: "IA32_APERF",
    0xfe: "IA32_MTRRCAP", 0x10a: "IA32_ARCH_CAPABILITIES",
    0x10b: "IA32_FLUSH_CMD", 0x174: "IA32_SYSENTER_CS",
    0x175: "IA32_SYSENTER_ESP", 0x176: "IA32_SYSENTER_EIP",
    0x179: "IA32_MCG_CAP", 0x17a: "IA32_MCG_STATUS",
    0x1a0: "IA32_MISC_ENABLE", 0x1d9: "IA32_DEBUGCTL", 0x277: "IA32_PAT",
    0x2ff: "IA32_MTRR_DEF_TYPE", 0x38d: "IA32_FIXED_CTR_CTRL",
    0x38e: "IA32_PERF_GLOBAL_STATUS", 0x38f: "IA32_PERF_GLOBAL_CTRL",
    0x390: "IA32_PERF_GLOBAL_OVF_CTRL", 0x6e0: "IA32_TSC_DEADLINE",
    0xda0: "IA32_XSS",
    **{0xc1 + i: "IA32_PMC%d" % i for i in range(8)},
    **{0x186 + i: "IA32_PERFEVTSEL%d" % i for i in range(8)},
    **{0x309 + i: "IA32_FIXED_CTR%d" % i for i in range(3)},
    **{0x200 + 2 * i: "IA32_MTRR_PHYSBASE%d" % i for i in range(8)},
    **{0x201 + 2 * i: "IA32_MTRR_PHYSMASK%d" % i for i in range(8)},
    # x2APIC registers: 0x800 + the xAPIC MMIO offset / 16.
    0x802: "X2APIC_ID", 0x803: "X2APIC_VERSION", 0x808: "X2APIC_TPR",
    0x80a: "X2APIC_PPR", 0x80b: "X2APIC_EOI", 0x80d: "X2APIC_LDR",
    0x80f: "X2APIC_SVR",
    **{0x810 + i: "X2APIC_ISR%d" % i for i in range(8)},
    **{0x818 + i: "X2APIC_TMR%d" % i for i in range(8)},
    **{0x820 + i: "X2APIC_IRR%d" % i for i in range(8)},
    0x828: "X2APIC_ESR", 0x82f: "X2APIC_LVT_CMCI", 0x830: "X2APIC_ICR",
    0x832: "X2APIC_LVT_TIMER", 0x833: "X2APIC_LVT_THERMAL",
    0x834: "X2APIC_LVT_PMI", 0x835: "X2APIC_LVT_LINT0",
    0x836: "X2APIC_LVT_LINT1", 0x837: "X2APIC_LVT_ERROR",
    0x838: "X2APIC_TMICT", 0x839: "X2APIC_TMCCT", 0x83e: "X2APIC_TDCR",
    0x83f: "X2APIC_SELF_IPI",
    0x40000000: "HV_GUEST_OS_ID", 0x40000001: "HV_HYPERCALL",
    0x40000002: "HV_VP_INDEX", 0x40000020: "HV_TIME_REF_COUNT",
    0x40000021: "HV_REFERENCE_TSC", 0x40000070: "HV_EOI",
    0x40000071: "HV_ICR", 0x40000072: "HV_TPR",
    **{0x400000b0 + 2 * i: "HV_STIMER%d_CONFIG" % i for i in range(4)},
    **{0x400000b1 + 2 * i: "HV_STIMER%d_COUNT" % i for i in range(4)},
    0x4b564d00: "KVM_WALL_CLOCK_NEW", 0x4b564d01: "KVM_SYSTEM_TIME_NEW",
    0x4b564d02: "KVM_ASYNC_PF_EN", 0x4b564d03: "KVM_STEAL_TIME",
    0x4b564d04: "KVM_PV_EOI_EN", 0x4b564d05: "KVM_POLL_CONTROL",
    0x4b564d06: "KVM_ASYNC_PF_INT", 0x4b564d07: "KVM_ASYNC_PF_ACK",
    0x4b564d08: "KVM_MIGRATION_CONTROL",
    0xc0000080: "IA32_EFER", 0xc0000081: "STAR", 0xc0000082: "LSTAR",
    0xc0000083: "CSTAR", 0xc0000084: "SYSCALL_MASK",
    0xc0000100: "FS_BASE", 0xc0000101: "GS_BASE",
    0xc0000102: "KERNEL_GS_BASE", 0xc0000103: "TSC_AUX",
    **{0xc0010000 + i: "AMD_PERF_CTL%d" % i for i in range(4)},
    **{0xc0010004 + i: "AMD_PERF_CTR%d" % i for i in range(4)},
    0xc0010015: "AMD_HWCR", 0xc0010114: "AMD_VM_CR",
    0xc0010117: "AMD_VM_HSAVE_PA", 0xc0011029: "AMD_DE_CFG",
}

# KVM_EXIT_* (uapi linux/kvm.h): why KVM_RUN returned to the VMM.
KVM_EXITS = dict(enumerate((
    "UNKNOWN", "EXCEPTION", "IO", "HYPERCALL", "DEBUG", "HLT", "MMIO",
    "IRQ_WINDOW_OPEN", "SHUTDOWN", "FAIL_ENTRY", "INTR", "SET_TPR",
    "TPR_ACCESS", "S390_SIEIC", "S390_RESET", "DCR", "NMI",
    "INTERNAL_ERROR", "OSI", "PAPR_HCALL", "S390_UCONTROL", "WATCHDOG",
    "S390_TSCH", "EPR", "SYSTEM_EVENT", "S390_STSI", "IOAPIC_EOI",
    "HYPERV", "ARM_NISV", "X86_RDMSR", "X86_WRMSR", "DIRTY_RING_FULL",
    "AP_RESET_HOLD", "X86_BUS_LOCK", "XEN", "RISCV_SBI", "RISCV_CSR",
    "NOTIFY")))

# KVM's own hypercalls (uapi linux/kvm_para.h, KVM_HC_*).
KVM_HYPERCALLS = {1: "VAPIC_POLL_IRQ", 3: "FEATURES", 5: "KICK_CPU",
                  9: "CLOCK_PAIRING", 10: "SEND_IPI", 11: "SCHED_YIELD",
                  12: "MAP_GPA_RANGE"}

VMX_CR_ACCESS = {0: "write", 1: "read", 2: "clts", 3: "lmsw"}
# kvm_mmio's types (its "unsatisfied-read": a read KVM sends out to user
# space; "read" is then its completion), and a write on KVM's fast MMIO
# bus (kvm_fast_mmio: ioeventfd).
MMIO_TYPES = {0: "unsat-read", 1: "read", 2: "write",
              MMIO_FAST_WRITE: "fast-write"}


# --- arm64: the sub-keys of TRAP exits ---------------------------------------
# kvm_wfx_arm64's is_wfe.
WFX_NAMES = {0: "WFI", 1: "WFE"}

# SMCCC function ids (Arm DEN0028; the kernel's uapi linux/psci.h and
# linux/arm-smccc.h), for the x0 of an HVC KVM answers.  Bit 31: a fast
# call; bit 30: the SMC64 convention; bits 29:24: the service that owns it.
PSCI_FUNCTIONS = (
    "VERSION", "CPU_SUSPEND", "CPU_OFF", "CPU_ON", "AFFINITY_INFO",
    "MIGRATE", "MIGRATE_INFO_TYPE", "MIGRATE_INFO_UP_CPU", "SYSTEM_OFF",
    "SYSTEM_RESET", "FEATURES", "CPU_FREEZE", "CPU_DEFAULT_SUSPEND",
    "NODE_HW_STATE", "SYSTEM_SUSPEND", "SET_SUSPEND_MODE", "STAT_RESIDENCY",
    "STAT_COUNT", "SYSTEM_RESET2", "MEM_PROTECT", "MEM_PROTECT_CHECK_RANGE")
# The PSCI functions with an SMC64 form too (their address arguments).
PSCI_64 = (1, 3, 4, 5, 7, 12, 13, 14, 16, 17, 18, 20)
SMCCC_FUNCTIONS = {
    **{0x84000000 + n: "PSCI_" + name
       for n, name in enumerate(PSCI_FUNCTIONS)},
    **{0xc4000000 + n: "PSCI_%s64" % PSCI_FUNCTIONS[n] for n in PSCI_64},
    0x80000000: "SMCCC_VERSION", 0x80000001: "SMCCC_ARCH_FEATURES",
    0x80000002: "SMCCC_ARCH_SOC_ID", 0x80008000: "SMCCC_ARCH_WORKAROUND_1",
    0x80007fff: "SMCCC_ARCH_WORKAROUND_2",
    0x80003fff: "SMCCC_ARCH_WORKAROUND_3",
    0x84000050: "TRNG_VERSION", 0x84000051: "TRNG_FEATURES",
    0x84000052: "TRNG_GET_UUID", 0x84000053: "TRNG_RND32",
    0xc4000053: "TRNG_RND64",
    0xc5000020: "PV_TIME_FEATURES", 0xc5000021: "PV_TIME_ST",
    # KVM's own, as the vendor hypervisor service.
    0x8600ff01: "VENDOR_HYP_CALL_UID", 0x86000000: "KVM_FEATURES",
    0x86000001: "KVM_PTP",
}
# A fast call's owning service, to name ids not in the table.
SMCCC_OWNERS = {0: "ARCH", 1: "CPU", 2: "SIP", 3: "OEM", 4: "STANDARD",
                5: "STANDARD_HYP", 6: "VENDOR_HYP", 48: "TRUSTED_APP",
                49: "TRUSTED_APP", **{n: "TRUSTED_OS" for n in range(50, 64)}}


def smccc_name(fid):
    """The function's name; else its service's for a well-formed fast call
    (bits 23:16 zero); else None."""
    if fid in SMCCC_FUNCTIONS:
        return SMCCC_FUNCTIONS[fid]
    owner = SMCCC_OWNERS.get(fid >> 24 & 0x3f)
    if fid >> 31 & 1 and not fid >> 16 & 0xff and owner:
        return owner + " call"
    return None


# System registers by (Op0, Op1, CRn, CRm, Op2) (Arm ARM, the kernel's
# asm/sysreg.h): the ones KVM traps -- ID registers, debug, timers, PMU,
# the GICv3 CPU interface and the EL1 controls KVM tracks.
SYSREG_NAMES = {
    # Debug and the OS lock (MDCR_EL2 traps).
    (2, 0, 0, 0, 2): "OSDTRRX_EL1", (2, 0, 0, 2, 0): "MDCCINT_EL1",
    (2, 0, 0, 2, 2): "MDSCR_EL1", (2, 0, 0, 3, 2): "OSDTRTX_EL1",
    (2, 0, 0, 6, 2): "OSECCR_EL1",
    **{(2, 0, 0, n, 4 + i): "DBG%s%d_EL1" % (reg, n)
       for i, reg in enumerate(("BVR", "BCR", "WVR", "WCR"))
       for n in range(16)},
    (2, 0, 1, 0, 0): "MDRAR_EL1", (2, 0, 1, 0, 4): "OSLAR_EL1",
    (2, 0, 1, 1, 4): "OSLSR_EL1", (2, 0, 1, 3, 4): "OSDLR_EL1",
    (2, 0, 1, 4, 4): "DBGPRCR_EL1", (2, 0, 7, 8, 6): "DBGCLAIMSET_EL1",
    (2, 0, 7, 9, 6): "DBGCLAIMCLR_EL1", (2, 0, 7, 14, 6): "DBGAUTHSTATUS_EL1",
    (2, 3, 0, 1, 0): "MDCCSR_EL0", (2, 3, 0, 4, 0): "DBGDTR_EL0",
    (2, 4, 0, 7, 0): "DBGVCR32_EL2",
    # Identification (HCR_EL2.TID*).
    (3, 0, 0, 0, 0): "MIDR_EL1", (3, 0, 0, 0, 5): "MPIDR_EL1",
    (3, 0, 0, 0, 6): "REVIDR_EL1",
    (3, 0, 0, 1, 0): "ID_PFR0_EL1", (3, 0, 0, 1, 1): "ID_PFR1_EL1",
    (3, 0, 0, 1, 2): "ID_DFR0_EL1", (3, 0, 0, 1, 3): "ID_AFR0_EL1",
    **{(3, 0, 0, 1, 4 + n): "ID_MMFR%d_EL1" % n for n in range(4)},
    **{(3, 0, 0, 2, n): "ID_ISAR%d_EL1" % n for n in range(6)},
    (3, 0, 0, 2, 6): "ID_MMFR4_EL1", (3, 0, 0, 2, 7): "ID_ISAR6_EL1",
    **{(3, 0, 0, 3, n): "MVFR%d_EL1" % n for n in range(3)},
    (3, 0, 0, 3, 4): "ID_PFR2_EL1", (3, 0, 0, 3, 5): "ID_DFR1_EL1",
    (3, 0, 0, 3, 6): "ID_MMFR5_EL1",
    (3, 0, 0, 4, 0): "ID_AA64PFR0_EL1", (3, 0, 0, 4, 1): "ID_AA64PFR1_EL1",
    (3, 0, 0, 4, 4): "ID_AA64ZFR0_EL1", (3, 0, 0, 4, 5): "ID_AA64SMFR0_EL1",
    (3, 0, 0, 5, 0): "ID_AA64DFR0_EL1", (3, 0, 0, 5, 1): "ID_AA64DFR1_EL1",
    (3, 0, 0, 5, 4): "ID_AA64AFR0_EL1", (3, 0, 0, 5, 5): "ID_AA64AFR1_EL1",
    **{(3, 0, 0, 6, n): "ID_AA64ISAR%d_EL1" % n for n in range(3)},
    **{(3, 0, 0, 7, n): "ID_AA64MMFR%d_EL1" % n for n in range(3)},
    (3, 1, 0, 0, 0): "CCSIDR_EL1", (3, 1, 0, 0, 1): "CLIDR_EL1",
    (3, 1, 0, 0, 2): "CCSIDR2_EL1", (3, 1, 0, 0, 7): "AIDR_EL1",
    (3, 2, 0, 0, 0): "CSSELR_EL1", (3, 3, 0, 0, 1): "CTR_EL0",
    (3, 3, 0, 0, 7): "DCZID_EL0",
    # EL1 controls (HCR_EL2.TVM/TRVM, TACR; pointer auth and MTE keys).
    (3, 0, 1, 0, 0): "SCTLR_EL1", (3, 0, 1, 0, 1): "ACTLR_EL1",
    (3, 0, 1, 0, 2): "CPACR_EL1", (3, 0, 1, 0, 5): "RGSR_EL1",
    (3, 0, 1, 0, 6): "GCR_EL1", (3, 0, 1, 2, 0): "ZCR_EL1",
    (3, 0, 1, 2, 1): "TRFCR_EL1", (3, 0, 1, 2, 4): "SMPRI_EL1",
    (3, 0, 1, 2, 6): "SMCR_EL1",
    (3, 0, 2, 0, 0): "TTBR0_EL1", (3, 0, 2, 0, 1): "TTBR1_EL1",
    (3, 0, 2, 0, 2): "TCR_EL1",
    **{(3, 0, 2, 1 + i // 2, 2 * (i % 2) + half): "AP%sKEY%s_EL1" % (k, hl)
       for i, k in enumerate(("IA", "IB", "DA", "DB"))
       for half, hl in enumerate(("LO", "HI"))},
    (3, 0, 2, 3, 0): "APGAKEYLO_EL1", (3, 0, 2, 3, 1): "APGAKEYHI_EL1",
    (3, 0, 4, 0, 0): "SPSR_EL1", (3, 0, 4, 0, 1): "ELR_EL1",
    (3, 0, 5, 1, 0): "AFSR0_EL1", (3, 0, 5, 1, 1): "AFSR1_EL1",
    (3, 0, 5, 2, 0): "ESR_EL1",
    (3, 0, 5, 3, 0): "ERRIDR_EL1", (3, 0, 5, 3, 1): "ERRSELR_EL1",
    (3, 0, 5, 4, 0): "ERXFR_EL1", (3, 0, 5, 4, 1): "ERXCTLR_EL1",
    (3, 0, 5, 4, 2): "ERXSTATUS_EL1", (3, 0, 5, 4, 3): "ERXADDR_EL1",
    (3, 0, 5, 5, 0): "ERXMISC0_EL1", (3, 0, 5, 5, 1): "ERXMISC1_EL1",
    (3, 0, 5, 6, 0): "TFSR_EL1", (3, 0, 5, 6, 1): "TFSRE0_EL1",
    (3, 0, 6, 0, 0): "FAR_EL1", (3, 0, 7, 4, 0): "PAR_EL1",
    (3, 0, 10, 2, 0): "MAIR_EL1", (3, 0, 10, 3, 0): "AMAIR_EL1",
    (3, 0, 10, 4, 0): "LORSA_EL1", (3, 0, 10, 4, 1): "LOREA_EL1",
    (3, 0, 10, 4, 2): "LORN_EL1", (3, 0, 10, 4, 3): "LORC_EL1",
    (3, 0, 10, 4, 7): "LORID_EL1",
    (3, 0, 12, 0, 0): "VBAR_EL1", (3, 0, 12, 1, 1): "DISR_EL1",
    (3, 0, 13, 0, 1): "CONTEXTIDR_EL1", (3, 0, 13, 0, 4): "TPIDR_EL1",
    (3, 0, 13, 0, 7): "SCXTNUM_EL1", (3, 0, 14, 1, 0): "CNTKCTL_EL1",
    (3, 3, 2, 4, 0): "RNDR_EL0", (3, 3, 2, 4, 1): "RNDRRS_EL0",
    (3, 3, 13, 0, 2): "TPIDR_EL0", (3, 3, 13, 0, 3): "TPIDRRO_EL0",
    (3, 3, 13, 0, 5): "TPIDR2_EL0", (3, 3, 13, 0, 7): "SCXTNUM_EL0",
    # PMU (MDCR_EL2.TPM*) and its statistical profiling extension.
    (3, 0, 9, 9, 0): "PMSCR_EL1", (3, 0, 9, 9, 1): "PMSNEVFR_EL1",
    (3, 0, 9, 9, 2): "PMSICR_EL1", (3, 0, 9, 9, 3): "PMSIRR_EL1",
    (3, 0, 9, 9, 4): "PMSFCR_EL1", (3, 0, 9, 9, 5): "PMSEVFR_EL1",
    (3, 0, 9, 9, 6): "PMSLATFR_EL1", (3, 0, 9, 9, 7): "PMSIDR_EL1",
    (3, 0, 9, 10, 0): "PMBLIMITR_EL1", (3, 0, 9, 10, 1): "PMBPTR_EL1",
    (3, 0, 9, 10, 3): "PMBSR_EL1", (3, 0, 9, 10, 7): "PMBIDR_EL1",
    (3, 0, 9, 14, 1): "PMINTENSET_EL1", (3, 0, 9, 14, 2): "PMINTENCLR_EL1",
    (3, 0, 9, 14, 6): "PMMIR_EL1",
    (3, 3, 9, 12, 0): "PMCR_EL0", (3, 3, 9, 12, 1): "PMCNTENSET_EL0",
    (3, 3, 9, 12, 2): "PMCNTENCLR_EL0", (3, 3, 9, 12, 3): "PMOVSCLR_EL0",
    (3, 3, 9, 12, 4): "PMSWINC_EL0", (3, 3, 9, 12, 5): "PMSELR_EL0",
    (3, 3, 9, 12, 6): "PMCEID0_EL0", (3, 3, 9, 12, 7): "PMCEID1_EL0",
    (3, 3, 9, 13, 0): "PMCCNTR_EL0", (3, 3, 9, 13, 1): "PMXEVTYPER_EL0",
    (3, 3, 9, 13, 2): "PMXEVCNTR_EL0", (3, 3, 9, 14, 0): "PMUSERENR_EL0",
    (3, 3, 9, 14, 3): "PMOVSSET_EL0",
    **{(3, 3, 14, 8 + n // 8, n % 8): "PMEVCNTR%d_EL0" % n
       for n in range(31)},
    **{(3, 3, 14, 12 + n // 8, n % 8): "PMEVTYPER%d_EL0" % n
       for n in range(31)},
    (3, 3, 14, 15, 7): "PMCCFILTR_EL0",
    # GICv3 CPU interface (ICH_HCR_EL2 traps).
    (3, 0, 4, 6, 0): "ICC_PMR_EL1",
    (3, 0, 12, 8, 0): "ICC_IAR0_EL1", (3, 0, 12, 8, 1): "ICC_EOIR0_EL1",
    (3, 0, 12, 8, 2): "ICC_HPPIR0_EL1", (3, 0, 12, 8, 3): "ICC_BPR0_EL1",
    **{(3, 0, 12, 8, 4 + n): "ICC_AP0R%d_EL1" % n for n in range(4)},
    **{(3, 0, 12, 9, n): "ICC_AP1R%d_EL1" % n for n in range(4)},
    (3, 0, 12, 11, 1): "ICC_DIR_EL1", (3, 0, 12, 11, 3): "ICC_RPR_EL1",
    (3, 0, 12, 11, 5): "ICC_SGI1R_EL1", (3, 0, 12, 11, 6): "ICC_ASGI1R_EL1",
    (3, 0, 12, 11, 7): "ICC_SGI0R_EL1",
    (3, 0, 12, 12, 0): "ICC_IAR1_EL1", (3, 0, 12, 12, 1): "ICC_EOIR1_EL1",
    (3, 0, 12, 12, 2): "ICC_HPPIR1_EL1", (3, 0, 12, 12, 3): "ICC_BPR1_EL1",
    (3, 0, 12, 12, 4): "ICC_CTLR_EL1", (3, 0, 12, 12, 5): "ICC_SRE_EL1",
    (3, 0, 12, 12, 6): "ICC_IGRPEN0_EL1", (3, 0, 12, 12, 7): "ICC_IGRPEN1_EL1",
    # The generic timer (CNTHCTL_EL2).
    (3, 3, 14, 0, 0): "CNTFRQ_EL0", (3, 3, 14, 0, 1): "CNTPCT_EL0",
    (3, 3, 14, 0, 2): "CNTVCT_EL0", (3, 3, 14, 0, 5): "CNTPCTSS_EL0",
    (3, 3, 14, 0, 6): "CNTVCTSS_EL0",
    (3, 3, 14, 2, 0): "CNTP_TVAL_EL0", (3, 3, 14, 2, 1): "CNTP_CTL_EL0",
    (3, 3, 14, 2, 2): "CNTP_CVAL_EL0",
    (3, 3, 14, 3, 0): "CNTV_TVAL_EL0", (3, 3, 14, 3, 1): "CNTV_CTL_EL0",
    (3, 3, 14, 3, 2): "CNTV_CVAL_EL0",
}


# A SYS64 trap's ESR ISS (the BPF keeps it with Rt and the direction
# cleared): Op0 21:20, Op2 19:17, Op1 16:14, CRn 13:10, CRm 4:1; bit 0
# (in attr) set for a read.  As a key: KVM's register-id order, Op0 15:14,
# Op1 13:11, CRn 10:7, CRm 6:3, Op2 2:0.
def sysreg_key(iss):
    return (iss >> 20 & 3) << 14 | (iss >> 14 & 7) << 11 | \
        (iss >> 10 & 15) << 7 | (iss >> 1 & 15) << 3 | iss >> 17 & 7


def sysreg_fields(key):
    """(Op0, Op1, CRn, CRm, Op2) of a sysreg key."""
    return key >> 14 & 3, key >> 11 & 7, key >> 7 & 15, key >> 3 & 15, \
        key & 7


def sysreg_encoding(key):
    """The register's generic name, as assemblers take it."""
    return "S%d_%d_C%d_C%d_%d" % sysreg_fields(key)


# A guest abort's ESR as kvm_guest_fault gives it (the BPF keeps the
# class, 31:26, WnR, 6, and the fault status code, 5:0).
ESR_EC_IABT_LOW, ESR_EC_IABT_CUR = 0x20, 0x21
ABORT_FAULTS = {0: "address-size", 1: "translation", 2: "access-flag",
                3: "permission"}
ABORT_OTHER_FAULTS = {0x10: "external", 0x21: "alignment",
                      0x30: "tlb-conflict"}


def abort_access(attr):
    """(op, name) of a guest abort: fetch, write or read; the fault."""
    if attr >> 26 in (ESR_EC_IABT_LOW, ESR_EC_IABT_CUR):
        op = "fetch"
    else:
        op = "write" if attr & 0x40 else "read"
    fsc = attr & 0x3f
    if fsc < 16:
        return op, "%s L%d" % (ABORT_FAULTS[fsc >> 2], fsc & 3)
    return op, ABORT_OTHER_FAULTS.get(fsc, "fault 0x%x" % fsc)


LABEL_KEY = {
    "port": "port 0x%x".__mod__, "msr": "msr 0x%x".__mod__,
    "page": "page 0x%x".__mod__, "mmio": "mmio 0x%x".__mod__,
    "vector": "vector %d".__mod__, "cr": "cr%d".__mod__,
    "hypercall": "hypercall %d".__mod__,
    "user": lambda key: "to user space",
    # arm64: WFI or WFE; a register by its name, else its encoding.
    "wfx": lambda key: WFX_NAMES.get(key, "is_wfe %d" % key),
    "smccc": "smccc 0x%x".__mod__,
    "sysreg": lambda key: "sysreg " + (
        SYSREG_NAMES.get(sysreg_fields(key)) or sysreg_encoding(key)),
    "ipa": "ipa 0x%x".__mod__,
}
# Kinds whose key's label already says the name.
NAMED_BY_KEY = {"wfx", "sysreg"}


class Detail(collections.namedtuple("Detail", "kind key op size name",
                                    defaults=(None, None, None))):
    """One decoded sub-key: kind, key (port, MSR, address, vector, CR,
    hypercall or KVM_EXIT_* number; on arm64 is_wfe, SMCCC function id,
    system register (sysreg_key()) or IPA), the access (op), its size in
    bytes and a name, where they apply."""

    __slots__ = ()

    def label(self):
        key = LABEL_KEY[self.kind](self.key)
        name = None if self.kind in NAMED_BY_KEY else self.name
        words = [key, self.op, self.size and "%dB" % self.size, name]
        return " ".join(w for w in words if w)


def decode_port(isa, code, key, attr):
    size, into, string, rep = ISA_BY_CODE[isa].port_access(attr)
    op = ("in" if into else "out") + ("s" if string else "")
    return Detail("port", key, ("rep " if rep else "") + op, size)


def decode_page(isa, code, key, attr):
    op, name = ISA_BY_CODE[isa].page_access(attr)
    return Detail("page", key, op, name=name)


def decode_vector(isa, code, key, attr):
    kind = ISA_BY_CODE[isa].vector_kind(attr)
    name = "#" + SVM_EXCEPTIONS[key] if key in SVM_EXCEPTIONS and \
        kind in ("exception", "soft-exc") else None
    return Detail("vector", key, kind, name=name)


def decode_sysreg(isa, code, key, attr):
    key = sysreg_key(key)
    return Detail("sysreg", key, "read" if attr & 1 else "write",
                  name=SYSREG_NAMES.get(sysreg_fields(key)))


def decode_ipa(isa, code, key, attr):
    op, name = abort_access(attr)
    return Detail("ipa", key, op, name=name)


DECODE = {
    "port": decode_port,
    "msr": lambda isa, code, key, attr: Detail(
        "msr", key, "write" if attr else "read", name=MSR_NAMES.get(key)),
    "page": decode_page,
    "mmio": lambda isa, code, key, attr: Detail(
        "mmio", key, MMIO_TYPES.get(attr & 0xff, str(attr & 0xff)),
        attr >> 8 or None),
    "vector": decode_vector,
    "cr": lambda isa, code, key, attr: Detail(
        "cr", key, VMX_CR_ACCESS[attr & 3]),
    "hypercall": lambda isa, code, key, attr: Detail(
        "hypercall", key, name=KVM_HYPERCALLS.get(key)),
    # With an errno (KVM_RUN failed, e.g. EINTR), the reason is stale.
    "user": lambda isa, code, key, attr: Detail(
        "user", key, name=("errno %s" % errno.errorcode.get(attr, attr))
        if attr else "KVM_EXIT_" + KVM_EXITS.get(key, str(key))),
    # arm64 (the ARM64 section of bpf/kvmexit.bpf.c's --detail).
    "wfx": lambda isa, code, key, attr: Detail(
        "wfx", key, name=WFX_NAMES.get(key, "is_wfe %d" % key)),
    "smccc": lambda isa, code, key, attr: Detail(
        "smccc", key, "imm %d" % attr if attr else None,
        name=smccc_name(key)),
    "sysreg": decode_sysreg,
    "ipa": decode_ipa,
}


def decode_detail(isa, code, kind, key, attr):
    """A Detail from a detail_counts key's fields."""
    return DECODE[DETAIL_KIND_NAMES[kind]](isa, code, key, attr)


def detail_rows(detail, group, top=None):
    """{(group, isa, code): [(Detail, count)]}: each reason's sub-keys, by
    count, largest first (then by kind, key and access); at most `top`.
    group(tgid, tid) as for ordered_rows()."""
    merged = merge_by(detail, lambda tgid, tid, isa, code, kind, key, attr:
                      (group(tgid, tid), isa, code, kind, key, attr))
    rows = {}
    for (g, isa, code, kind, key, attr), n in sorted(
            merged.items(), key=lambda kv: (-kv[1], kv[0][3:])):
        subs = rows.setdefault((g, isa, code), [])
        if not top or len(subs) < top:
            subs.append((decode_detail(isa, code, kind, key, attr), n))
    return rows


def detail_record(detail, count):
    """A sub-key as --json gives it."""
    return {"kind": detail.kind, "key": detail.key, "op": detail.op,
            "size": detail.size, "name": detail.name, "count": count}


#
# The program: its maps and features, declared once as data
#
class Key(collections.namedtuple("Key", "layout names")):
    """A map's key: its layout (a struct.Struct, one letter per field) and
    its fields' names, as in the C struct; load_program() checks both
    against the key type bcc builds from the C."""

    __slots__ = ()

    @property
    def size(self):
        return self.layout.size

    def field_sizes(self):
        return [struct.calcsize("<" + letter)
                for letter in self.layout.format.lstrip("<")]


INDEX_KEY = Key(struct.Struct("<I"), ("index",))      # arrays
TGID_KEY = Key(struct.Struct("<I"), ("tgid",))
THREAD_KEY = Key(struct.Struct("<Q"), ("pid_tgid",))
REASON_KEY = Key(struct.Struct("<QII"), ("pid_tgid", "isa", "code"))
DETAIL_KEY = Key(struct.Struct("<QIIQII"),
                 ("pid_tgid", "isa", "code", "sub", "kind", "attr"))


def pid_tgid_of(key):
    return THREAD_KEY.layout.unpack_from(key)[0]


class Table(collections.namedtuple("Table",
                                   "name fields values since live")):
    """A table of a Snapshot: {(tgid, tid) + fields: value}.  Values add
    with +; since(now, then) is an interval's value, live(value) whether an
    interval keeps it, and values(array) turns a map's values
    [entry][cpu][word] into the table's."""

    __slots__ = ()


def summed(values):
    return values.sum(axis=(1, 2), dtype=np.uint64).tolist()


def latencies(values):
    """struct latency {count, total_ns, max_ns, hist[]} -> Latency (the
    words of LATENCY_WORDS)."""
    return [Latency(w[0], w[1], w[2], w[3:])
            for w in values[:, 0].tolist()]


def difference(now, then):
    return now - then


COUNTS = Table("counts", ("isa", "code"), summed, difference, bool)
LATENCIES = Table("latency", ("isa", "code"), latencies, Latency.since,
                  lambda lat: lat.count)
DETAILS = Table("detail", ("isa", "code", "kind", "sub", "attr"), summed,
                difference, bool)
TABLES = (COUNTS, LATENCIES, DETAILS)

# Bytes the kernel adds to each element of a preallocated hash table.
HASH_ELEM_OVERHEAD = 64


def hash_bytes(entries, key, value_bytes):
    return entries * (key.size + value_bytes + HASH_ELEM_OVERHEAD)


class MapSpec(collections.namedtuple(
        "MapSpec", "name key words percpu merge feature memory")):
    """One map of bpf/kvmexit.bpf.c.  Reading, retiring, interval
    differences and the memory check all go through these.

    key: its Key.  words(layout): u64 words of a value as read here
    (checked at load; None: never read here).  percpu: a value per
    possible CPU.  merge: the Snapshot Table its entries add to, or its
    role: "cache" (pcpu_cache), "threads" (the thread table), "lost"
    (counters of what was not counted), "pending" (per-thread state,
    deleted when the thread is retired), None (left alone).  feature: the
    feature that adds it (None: always there).  memory(program, ncpus):
    its kernel memory in bytes (the formulas tests/bench/memory.py
    checks; None: too small to count)."""

    __slots__ = ()


def one_word(layout):
    return 1


CACHE_MAP = MapSpec(b"pcpu_cache", INDEX_KEY,
                    lambda layout: 1 + layout.words, True, "cache", None,
                    None)
# Its element, with the 8-byte key and the per-CPU value's pointer, is
# HASH_ELEM_OVERHEAD (tests/bench/memory.py's percpu_hash()).
THREAD_MAP = MapSpec(b"pcpu_kvm_stat", THREAD_KEY,
                     lambda layout: layout.words, True, "threads", None,
                     lambda p, ncpus: p.max_threads * (
                         8 * p.layout.words * ncpus + HASH_ELEM_OVERHEAD))
RARE_MAP = MapSpec(b"pcpu_rare_stat", REASON_KEY, one_word, True, COUNTS,
                   None, lambda p, ncpus: hash_bytes(MAX_RARE, REASON_KEY,
                                                     8 * ncpus))
LOST_MAP = MapSpec(b"pcpu_lost", INDEX_KEY, one_word, True, "lost", None,
                   None)
# struct latency: count, total_ns, max_ns, then the histogram.
LATENCY_WORDS = 3 + LAT_BUCKETS
LATENCY_MAP = MapSpec(b"exit_latency", REASON_KEY,
                      lambda layout: LATENCY_WORDS, False, LATENCIES,
                      "latency", lambda p, ncpus: hash_bytes(
                          LATENCY_PER_THREAD * p.max_threads, REASON_KEY,
                          8 * LATENCY_WORDS))
PENDING_MAP = MapSpec(b"pending_exit", THREAD_KEY, None, False, "pending",
                      "latency", lambda p, ncpus: hash_bytes(
                          p.max_threads, THREAD_KEY, 16))
DETAIL_MAP = MapSpec(b"detail_counts", DETAIL_KEY, one_word, False, DETAILS,
                     "detail", lambda p, ncpus: hash_bytes(
                         MAX_DETAIL, DETAIL_KEY, 8))
# Where each thread's last exit is (a CPU's slot, or the entry itself).
# LRU: the threads that are gone make room by themselves.
EXIT_HOME_MAP = MapSpec(b"exit_home", THREAD_KEY, None, False, None,
                        "detail", lambda p, ncpus: hash_bytes(
                            p.max_threads, THREAD_KEY, 16))
# Each CPU's last exit, 128 bytes a CPU (struct exit_slot).
EXIT_SLOTS_MAP = MapSpec(b"exit_slots", INDEX_KEY, None, False, None,
                         "detail", lambda p, ncpus: 128 * ncpus)
# Each CPU's pending sub-key counts: PENDING_ENTRIES entries of 48 bytes
# (struct detail_pending), read only through flush_details().
PENDING_ENTRIES = 16
DETAIL_PENDING_MAP = MapSpec(b"detail_pending", INDEX_KEY, None, False, None,
                             "detail", lambda p, ncpus: 48 * PENDING_ENTRIES
                             * ncpus)
DETAIL_LOST_MAP = MapSpec(b"detail_lost", INDEX_KEY, one_word, True, "lost",
                          "detail", lambda p, ncpus: 8 * ncpus)
# The names the kernel took of VMs as their threads first exited (struct
# vm_comm: start time, command line length, comm, VM_CMDLINE_BYTES of the
# command line).
VM_CMDLINE_BYTES = 256
VM_COMM = struct.Struct("<QI4x16s%ds" % VM_CMDLINE_BYTES)
VM_COMM_MAP = MapSpec(b"vm_comm", TGID_KEY,
                      lambda layout: VM_COMM.size // 8, False, "names",
                      "names", lambda p, ncpus: hash_bytes(
                          p.max_threads, TGID_KEY, VM_COMM.size))
# The thread table's generations after the first (ThreadTables.grow()).
GENERATIONS_MAP = MapSpec(b"thread_tables", INDEX_KEY, None, False, None,
                          "growth", None)
# In the order retirement visits them.
MAPS = (CACHE_MAP, THREAD_MAP, RARE_MAP, LOST_MAP, LATENCY_MAP, PENDING_MAP,
        DETAIL_MAP, EXIT_HOME_MAP, EXIT_SLOTS_MAP, DETAIL_PENDING_MAP,
        DETAIL_LOST_MAP,
        VM_COMM_MAP, GENERATIONS_MAP)


def pid_max():
    """TIDs are below this (at most 2^22 on 64-bit Linux)."""
    try:
        return int(read_text("/proc/sys/kernel/pid_max"))
    except (OSError, ValueError):
        return 1 << 22


def latency_macros(program):
    return ["-DLATENCY",
            "-DMAX_LATENCY=%d" % (LATENCY_PER_THREAD * program.max_threads)]


def detail_macros(tp_dir=None):
    """-DDETAIL, its table's room, the kinds' numbers and the exit codes
    its C tells apart; and whether kvm_exit has intr_info (older kernels'
    tracepoint has not)."""
    tp_dir = tp_dir or tracepoint_dir()
    intr_info = tp_dir and "intr_info;" in read_text(tp_dir + "/format")
    cpus = max(cpu_list(POSSIBLE_CPUS)) + 1
    return ["-DDETAIL", "-DMAX_DETAIL=%d" % MAX_DETAIL,
            "-DDETAIL_CPUS=%d" % cpus,
            "-DPENDING_ENTRIES=%d" % PENDING_ENTRIES] + \
        ["-DDETAIL_%s=%d" % (name.upper(), n)
         for name, n in DETAIL_KINDS.items()] + \
        ["-D%s=%d" % item for item in DETAIL_CODES.items()] + \
        (["-DTP_HAS_INTR_INFO"] if intr_info else [])


# What the kernel reads to name a VM (-DVM_NAMES): macro, struct, member.
TASK_OFFSETS = (
    ("TASK_GROUP_LEADER_OFF", "task_struct", "group_leader"),
    ("TASK_COMM_OFF", "task_struct", "comm"),
    ("TASK_START_OFF", "task_struct", "start_boottime"),
    ("TASK_MM_OFF", "task_struct", "mm"),
    ("MM_ARG_START_OFF", "mm_struct", "arg_start"),
    ("MM_ARG_END_OFF", "mm_struct", "arg_end"),
)


def task_offsets(btf_dir=BTF_DIR):
    """{macro: offset} of TASK_OFFSETS from the kernel's BTF, for the names
    the kernel takes (-DVM_NAMES); None without BTF or without one of
    them."""
    vmlinux = load_btf("vmlinux", btf_dir=btf_dir)
    if vmlinux is None:
        return None
    found = {macro: vmlinux.offset(struct_name, member)
             for macro, struct_name, member in TASK_OFFSETS}
    return None if None in found.values() else found


def growth_macros(program):
    return ["-DGROWTH=%d" % GENERATIONS]


def names_macros(program):
    return ["-DVM_NAMES"] + ["-D%s=%d" % item
                             for item in task_offsets().items()]


class Feature(collections.namedtuple("Feature", "name cflags")):
    """An option that adds to the program: its flags (cflags(program)), and
    the maps whose spec names it."""

    __slots__ = ()


FEATURES = (Feature("latency", latency_macros),
            Feature("detail", lambda program: detail_macros()),
            Feature("names", names_macros),
            Feature("growth", growth_macros))


class Program(collections.namedtuple(
        "Program", "probe selection max_threads layout features",
        defaults=(frozenset(),))):
    """One configuration of bpf/kvmexit.bpf.c, built once from the options:
    what it compiles with, which maps it has, what memory they take."""

    __slots__ = ()

    def maps(self):
        return [m for m in MAPS
                if m.feature is None or m.feature in self.features]

    def cflags(self):
        return shared_macros() + self.probe.macros() + \
            self.layout.macros() + self.selection.kernel_filter() + [
                "-DTID_WORDS=%d" % ((pid_max() + 63) // 64),
                "-DMAX_THREADS=%d" % self.max_threads,
                "-DMAX_RARE=%d" % MAX_RARE,
            ] + [flag for feature in FEATURES
                 if feature.name in self.features
                 for flag in feature.cflags(self)]

    def memory(self, ncpus):
        """Kernel memory of the preallocated tables, in bytes: per thread,
        one counter block per possible CPU."""
        return sum(m.memory(self, ncpus) for m in self.maps() if m.memory)


#
# BPF program: compile, load, attach
#
def bpf_source():
    """bpf/kvmexit.bpf.c beside the real script (also when run through a
    symlink, e.g. from bcc's tools directory), else where setup.cfg put it."""
    here = os.path.dirname(os.path.realpath(__file__))
    # Installed, the module is in PREFIX/lib/python3*/*-packages.
    prefix = os.path.normpath(os.path.join(here, "..", "..", ".."))
    for path in (os.path.join(here, "bpf", "kvmexit.bpf.c"),
                 os.path.join(prefix, "share", "kvmexit", "kvmexit.bpf.c"),
                 "/usr/local/share/kvmexit/kvmexit.bpf.c",
                 "/usr/share/kvmexit/kvmexit.bpf.c"):
        if os.path.exists(path):
            return path
    raise Error("cannot find kvmexit.bpf.c beside %s or in share/kvmexit"
                % here)


def check_bcc():
    if MISSING is None:
        return
    if isinstance(MISSING, ImportError):
        raise Error("%s cannot import %s (Python %s): install python3-bpfcc "
                    "and python3-numpy, or run kvmexit with the python3 that"
                    " has them (e.g. /usr/bin/python3)"
                    % (sys.executable, MISSING.name or "bcc",
                       ".".join(map(str, sys.version_info[:3]))))
    first = (str(MISSING).splitlines() or ["?"])[0]
    if isinstance(MISSING, OSError):
        # bcc's module is there but its library is not (libbcc.so.0).
        raise Error("bcc cannot load: %s: reinstall libbpfcc (python3-bpfcc)"
                    % first)
    raise Error("bcc or numpy failed to import: %s: %s: reinstall "
                "python3-bpfcc and python3-numpy"
                % (type(MISSING).__name__, first))


#
# Privileges: capabilities, not uid 0
#
CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_SYS_ADMIN = 2, 19, 21
CAP_PERFMON, CAP_BPF = 38, 39           # Linux 5.8+


def capabilities(status="/proc/self/status"):
    """The effective capability set, as a bit mask."""
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", read_text(status),
                      re.M)
    return int(match.group(1), 16) if match else 0


def last_capability(path="/proc/sys/kernel/cap_last_cap"):
    try:
        return int(read_text(path))
    except (OSError, ValueError):
        return CAP_BPF


def missing_capabilities(caps, last_cap):
    """What loading the program and attaching it to a tracepoint needs that
    `caps` lacks: CAP_BPF and CAP_PERFMON where the kernel has them,
    CAP_SYS_ADMIN (which also does) before."""
    if caps >> CAP_SYS_ADMIN & 1:
        return []
    if last_cap < CAP_BPF:
        return ["CAP_SYS_ADMIN"]
    return [name for cap, name in ((CAP_BPF, "CAP_BPF"),
                                   (CAP_PERFMON, "CAP_PERFMON"))
            if not caps >> cap & 1]


def check_privileges(status="/proc/self/status",
                     last_cap="/proc/sys/kernel/cap_last_cap",
                     tracefs_dirs=TRACEFS_DIRS):
    """Root is not needed, the capabilities are; and tracefs, where the
    tracepoint's format is read, is root's alone unless searched with
    CAP_DAC_READ_SEARCH."""
    missing = missing_capabilities(capabilities(status),
                                   last_capability(last_cap))
    if missing == ["CAP_SYS_ADMIN"]:
        raise Error("missing CAP_SYS_ADMIN: needed to load and attach the "
                    "BPF program (this kernel has no CAP_BPF)")
    if missing:
        raise Error("missing %s (or CAP_SYS_ADMIN): needed to load and "
                    "attach the BPF program" % " and ".join(missing))
    for d in tracefs_dirs:
        try:
            os.stat(d + "/events")
            return
        except PermissionError:
            raise Error("cannot search %s for the kvm_exit tracepoint: "
                        "missing CAP_DAC_READ_SEARCH" % d)
        except OSError:
            continue            # not mounted there: tracepoint_dir() tells


def fds_hidden(pid, proc="/proc"):
    """Whether a process's open files cannot be read: another user's
    process, read without CAP_DAC_READ_SEARCH (to list /proc/PID/fd) and
    CAP_SYS_PTRACE (to read its links, where vCPU fds show their ids)."""
    fd_dir = "%s/%d/fd" % (proc, pid)
    try:
        for fd in os.listdir(fd_dir):
            os.readlink("%s/%s" % (fd_dir, fd))
            return False
    except PermissionError:
        return True
    except OSError:
        pass
    return False


def select_readable(args, proc="/proc", status="/proc/self/status"):
    """select_threads(), saying so when -v's vCPU was not found because the
    VMM's /proc entries could not be read."""
    try:
        return select_threads(args, proc)
    except Error as e:
        if args.vcpu is None or args.pid is None or \
                not fds_hidden(args.pid, proc):
            raise
        caps = capabilities(status)
        if caps >> CAP_SYS_PTRACE & 1 and caps >> CAP_DAC_READ_SEARCH & 1:
            # Not for want of capabilities: something else keeps that
            # process's files from this one (a security module, say).
            why = "permission denied even with CAP_SYS_PTRACE and " \
                  "CAP_DAC_READ_SEARCH"
        else:
            why = "another user's process: needs CAP_SYS_PTRACE and " \
                  "CAP_DAC_READ_SEARCH"
        raise Error("%s: cannot read its /proc/%d/fd (%s)"
                    % (e, args.pid, why))


# bcc's messages that name the cause better than the compiler's errors
# that follow them.
BCC_CAUSES = ("Unable to find kernel headers",)


def capture_file():
    """A file for CapturedStderr: in memory, else a temporary file, else
    None (no usable temporary directory, RLIMIT_FSIZE...)."""
    try:
        fd = os.memfd_create("kvmexit-messages")
    except (OSError, AttributeError):
        try:
            return tempfile.TemporaryFile(mode="w+", errors="replace")
        except OSError:
            return None
    return open(fd, "w+", errors="replace")


def flush_c_stdio():
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


class CapturedStderr:
    """Holds what libbcc and clang write to fds 1 and 2 (they bypass
    sys.stdout and sys.stderr; bcc prints some complaints to stdout, which
    would land in the report), so that a failure can be told in one line.
    Kept in memory (memfd): it needs no temporary directory, and if even
    that fails the run goes on, showing the messages as they come."""

    FDS = (1, 2)

    def __init__(self):
        self.text, self.file, self.saved = "", None, []

    def __enter__(self):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass            # a full stream: the report tells later
        self.file = capture_file()
        if self.file is not None:
            for fd in self.FDS:
                self.saved.append((fd, os.dup(fd)))
                os.dup2(self.file.fileno(), fd)
        return self

    def __exit__(self, *exc):
        if self.file is None:
            return
        flush_c_stdio()     # bcc's C++ stdout is buffered in libc
        for fd, saved in self.saved:
            os.dup2(saved, fd)
            os.close(saved)
        self.file.seek(0)
        self.text = self.file.read()
        self.file.close()

    def first_error(self):
        """bcc's own word on the cause, else the compiler's first error,
        else the verifier's verdict (the line before its 'processed N
        insns' summary)."""
        lines = [l.strip() for l in self.text.splitlines() if l.strip()]
        for line in lines:
            if line.startswith(BCC_CAUSES):
                return line
        for line in lines:
            if "error:" in line:
                return line
        for before, line in zip(lines, lines[1:]):
            if line.startswith("processed "):
                return before
        return lines[0] if lines else ""


def check_program(b, source):
    """An empty or gutted kvmexit.bpf.c compiles to nothing: say so before
    its tables are looked for."""
    if not libbcc.bpf_num_functions(b.module):
        b.cleanup()
        raise Error("%s defines no BPF program: reinstall kvmexit"
                    % source.decode())


def mem_available(meminfo="/proc/meminfo"):
    match = re.search(r"^MemAvailable:\s+(\d+) kB", read_text(meminfo), re.M)
    return int(match.group(1)) * 1024 if match else None


def gib(n):
    return "%.1f GiB" % (n / 2 ** 30) if n >= 2 ** 30 else \
        "%.1f MiB" % (n / 2 ** 20)


def check_table_memory(program, ncpus, meminfo="/proc/meminfo"):
    """Refuse tables that would take more than half of the memory available
    now, before any is created: the kernel allocates them whole, outside
    cgroup v1 limits, and on a hypervisor the OOM killer may pick a VM."""
    need = program.memory(ncpus)
    available = mem_available(meminfo)
    if available is not None and need > available // 2:
        raise Error("the counter tables would take %s of kernel memory "
                    "(%d threads x %d possible CPUs x %d B), more than half "
                    "of the %s available now; lower --max-threads"
                    % (gib(need), program.max_threads, ncpus,
                       8 * program.layout.words,
                       gib(available)))


def ctype_fields(ctype):
    """([field sizes], (field names) or None) of a key type bcc built."""
    fields = getattr(ctype, "_fields_", None)
    if not fields:
        return [ctypes.sizeof(ctype)], None
    return [ctypes.sizeof(t) for _, t in fields], \
        tuple(name for name, _ in fields)


def check_maps(b, program):
    """The maps' keys and values as the C declares them (bcc's types) are
    as their specs read them: a mismatch is a bug in kvmexit."""
    for spec in program.maps():
        table = b[spec.name]
        sizes, names = ctype_fields(table.Key)
        value = ctypes.sizeof(getattr(table, "sLeaf", table.Leaf))
        words = spec.words and spec.words(program.layout)
        if sizes != spec.key.field_sizes() or \
                names not in (None, spec.key.names) or \
                (words and value != 8 * words):
            raise Error("map %s of %s is not as kvmexit.py reads it (key "
                        "%s %s, value %d B): a bug in kvmexit"
                        % (spec.name.decode(), bpf_source(), names, sizes,
                           value))


def fill_tid_filter(b, tids):
    """Set the TIDs' bits in the filter bitmap, one word at a time."""
    words = {}
    for tid in tids:
        words[tid // 64] = words.get(tid // 64, 0) | 1 << (tid % 64)
    table = b[b"tid_filter"]
    for word, bits in words.items():
        table[ctypes.c_uint32(word)] = ctypes.c_uint64(bits)


def load_program(program, debug=False):
    """Compile and load.  Tracepoint programs are attached by bcc as it
    loads them; raw ones by attach_raw()."""
    cflags = program.cflags()
    if debug:
        print("kvmexit: cflags: %s" % " ".join(cflags), file=sys.stderr)
    source = bpf_source().encode()
    err = CapturedStderr()
    try:
        with err:
            b = bcc.BPF(src_file=source, cflags=cflags)
    except Exception as e:
        if debug:
            sys.stderr.write(err.text)
        stage = "compile" if "compile" in str(e) else "load"
        raise Error("BPF %s failed: %s" % (stage, err.first_error() or e))
    if debug:
        sys.stderr.write(err.text)
    check_program(b, source)
    try:
        check_maps(b, program)
    except Error:
        b.cleanup()
        raise
    if "-DFILTER_TIDS" in program.selection.kernel_filter():
        fill_tid_filter(b, program.selection.tids)
    return b


def attach_raw(b):
    with CapturedStderr():
        b.attach_raw_tracepoint(tp=b"kvm_exit", fn_name=b"raw_kvm_exit")


def start_tracing(program, debug=False):
    """Load and attach; a raw probe the kernel refuses falls back to the
    regular tracepoint, unless raw was asked for.  Returns (BPF object,
    the program as loaded)."""
    b = load_program(program, debug)
    probe = program.probe
    if probe.raw:
        try:
            attach_raw(b)
        except Exception as e:
            b.cleanup()
            if probe.fallback is None:
                raise Error("cannot attach the raw tracepoint: %s" % e)
            probe = probe.fallback
            probe.why += " (%s)" % e
            check_vcpu_ids(program.selection, probe)
            program = program._replace(probe=probe)
            b = load_program(program, debug)
    if "detail" in program.features:
        flush_details(b)    # loads its program: a refusal shows at start
    return b, program


#
# Reading the maps
#
BPF_MAP_TYPE_PERCPU_HASH = 5


class RawMap(collections.namedtuple("RawMap", "map_fd max_entries")):
    """A map kvmexit made itself, read as bcc's tables are."""

    __slots__ = ()


# A new table is described to the kernel with BTF, as bcc describes its
# own maps: Linux up to 6.1 compares what it found in the value's BTF type
# (where a bpf_timer is: none in a struct, "no struct" otherwise) between a
# map-in-map's inner table and the template, bcc's pcpu_kvm_stat, whose
# value is struct thread_counts; a table made without BTF, or with a value
# that is not a struct, is refused with EINVAL.  So: a struct of u64s.
BTF_MAGIC = 0xeb9f
BTF_INT, BTF_ARRAY, BTF_STRUCT = 1 << 24, 3 << 24, 4 << 24
BTF_U64, BTF_U32, BTF_U64S, BTF_COUNTERS = 1, 2, 3, 4     # type ids


def counters_btf(words):
    """A BTF blob: u64, u32, u64[words] and struct thread_counts { u64
    c[words]; }."""
    strings = b"\0u64\0u32\0thread_counts\0c\0"
    types = struct.pack("<IIII", 1, BTF_INT, 8, 64) + \
        struct.pack("<IIII", 5, BTF_INT, 4, 32) + \
        struct.pack("<IIIIII", 0, BTF_ARRAY, 0, BTF_U64, BTF_U32, words) + \
        struct.pack("<IIIIII", 9, BTF_STRUCT | 1, 8 * words, 23, BTF_U64S,
                    0)
    header = struct.pack("<HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(types),
                         len(types), len(strings))
    return header + types + strings


class MapCreateOpts(ctypes.Structure):
    """libbpf's struct bpf_map_create_opts (libbpf 1.x)."""
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32),
                ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("numa_node", ctypes.c_uint32),
                ("map_ifindex", ctypes.c_uint32)]


def libbpf():
    """libbpf.so.1, which libbcc is linked with."""
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as e:
        raise Error("cannot load libbpf.so.1 (libbpf1): %s" % e)
    lib.bpf_btf_load.restype = ctypes.c_int
    lib.bpf_btf_load.argtypes = [ctypes.c_char_p, ctypes.c_size_t,
                                 ctypes.c_void_p]
    lib.bpf_map_create.restype = ctypes.c_int
    lib.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p] + \
        [ctypes.c_uint32] * 3 + [ctypes.POINTER(MapCreateOpts)]
    return lib


def create_map(map_type, key_size, value_size, max_entries):
    """A new preallocated map's fd: a u64 key, a struct of u64s."""
    lib = libbpf()
    btf = counters_btf(value_size // 8)
    btf_fd = lib.bpf_btf_load(btf, len(btf), None)
    if btf_fd < 0:
        raise Error("cannot load the BTF of a new table: %s"
                    % os.strerror(-btf_fd))
    try:
        opts = MapCreateOpts(sz=ctypes.sizeof(MapCreateOpts), btf_fd=btf_fd,
                             btf_key_type_id=BTF_U64,
                             btf_value_type_id=BTF_COUNTERS)
        fd = lib.bpf_map_create(map_type, b"pcpu_kvm_stat", key_size,
                                value_size, max_entries, ctypes.byref(opts))
    finally:
        os.close(btf_fd)
    if fd < 0:
        raise Error("cannot create a table of %d entries: %s"
                    % (max_entries, os.strerror(-fd)))
    return fd


def map_keys(fd, key_size):
    keys, key = [], None
    bufs = (ctypes.create_string_buffer(key_size),
            ctypes.create_string_buffer(key_size))
    while libbcc.bpf_get_next_key(fd, key, bufs[len(keys) % 2]) == 0:
        key = bufs[len(keys) % 2]
        keys.append(key.raw)
    return keys


def lookup_batch(fd, key_size, words, ncpus, max_entries):
    """(keys, uint64 array [key][cpu][word]) of a whole hash map through
    BPF_MAP_LOOKUP_BATCH (Linux 5.6+), or None where the kernel has no
    batch operations.  The buffers have room for a full map; the pages
    the kernel does not fill are never touched, so they cost no memory."""
    try:
        keys = np.zeros((max_entries, key_size), dtype=np.uint8)
        values = np.zeros((max_entries, ncpus, words), dtype=np.uint64)
    except MemoryError:
        return None     # not even the address space for it: key by key
    token, count = ctypes.c_uint32(), ctypes.c_uint32()
    total, first = 0, True
    while total < max_entries:
        count.value = max_entries - total
        ret = libbcc.bpf_lookup_batch(
            fd, None if first else ctypes.byref(token), ctypes.byref(token),
            ctypes.c_void_p(keys[total:].ctypes.data),
            ctypes.c_void_p(values[total:].ctypes.data), ctypes.byref(count))
        err = ctypes.get_errno()
        total += count.value
        if ret == 0:
            first = False
            continue
        if err == errno.ENOENT:         # the end of the map
            break
        if first and total == 0:
            return None                 # EINVAL etc.: no batch ops here
        raise Error("reading map %d: %s" % (fd, os.strerror(err)))
    raw = keys[:total].tobytes()
    return ([raw[i:i + key_size] for i in range(0, len(raw), key_size)],
            values[:total])


def read_percpu(table, key_size, words, ncpus, keys=None):
    """(keys, uint64 array [key][cpu][word]) of a per-CPU map: the whole
    map in one batch where the kernel can, else one lookup per key,
    straight into one buffer."""
    fd = table.map_fd
    if keys is None:
        found = lookup_batch(fd, key_size, words, ncpus, table.max_entries)
        if found is not None:
            return found
        keys = map_keys(fd, key_size)
    values = np.zeros((len(keys), ncpus, words), dtype=np.uint64)
    for i, key in enumerate(keys):
        # A key can vanish only if someone else deletes it; keep zeroes.
        libbcc.bpf_lookup_elem(fd, ctypes.c_char_p(key),
                               ctypes.c_void_p(values[i].ctypes.data))
    return keys, values


def read_map(b, spec, layout, ncpus, keys=None):
    """read_percpu() of a map by its spec (the whole map, or those keys)."""
    return read_percpu(b[spec.name], spec.key.size, spec.words(layout),
                       ncpus if spec.percpu else 1, keys=keys)


def read_entries(b, spec, layout, ncpus, keys=None):
    """{(tgid, tid) + fields: value} of a map whose entries add to a
    Snapshot table (spec.merge), as that table keys and values them."""
    keys, values = read_map(b, spec, layout, ncpus, keys)
    table = spec.merge
    at = [spec.key.names.index(field) for field in table.fields]
    unpack = spec.key.layout.unpack
    entries = {}
    for key, value in zip(keys, table.values(values)):
        fields = unpack(key)
        entries[(fields[0] >> 32, fields[0] & 0xffffffff) +
                tuple(fields[i] for i in at)] = value
    return entries


def read_lost(b, spec, layout, ncpus, count):
    """[count] of each of a lost counters array's first `count` entries,
    summed over CPUs."""
    keys = [INDEX_KEY.layout.pack(i) for i in range(count)]
    _, lost = read_map(b, spec, layout, ncpus, keys=keys)
    return [int(x) for x in lost.sum(axis=(1, 2))]


# A table this big is summed on several cores at once: one core's memory
# bandwidth is the limit (a 640-CPU host's table of 4,096 threads is
# 3.8 GiB), and numpy lets other threads run while it adds.
PARALLEL_SUM_BYTES = 256 << 20
PARALLEL_SUM_THREADS = 8


def sum_over_cpus(values):
    """values[thread][cpu][header + slots] -> uint64 [thread][slot]."""
    out = np.empty((values.shape[0], values.shape[2] - 1), dtype=np.uint64)
    workers = min(PARALLEL_SUM_THREADS, len(os.sched_getaffinity(0)))
    if values.nbytes < PARALLEL_SUM_BYTES or workers < 2:
        return np.sum(values[:, :, 1:], axis=1, dtype=np.uint64, out=out)
    bounds = np.linspace(0, len(values), workers + 1).astype(int).tolist()

    def part(start, end):
        np.sum(values[start:end, :, 1:], axis=1, dtype=np.uint64,
               out=out[start:end])
    # map() raises here what a part raised there.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(part, bounds, bounds[1:]))
    return out


def merge_thread_counts(keys, values, cache_keys, cache_values):
    """Sum each thread's counters over CPUs.

    keys: pid_tgid per row of values [thread][cpu][header + slots];
    cache_keys/cache_values [cpu][...]: each CPU's cache slot.  Counters
    only grow, and a thread's cache slot and hash entry on one CPU are two
    copies of the same counters taken at different times, so the larger
    of the two is the current one, whatever order they were read in.
    Returns (pid_tgid list, uint64 [thread][slot], header [thread])."""
    keys = list(keys)
    index = {k: i for i, k in enumerate(keys)}
    extra = [k for k in cache_keys if k and k not in index]
    if extra:
        for k in dict.fromkeys(extra):
            index[k] = len(keys)
            keys.append(k)
        pad = np.zeros((len(keys) - len(values),) + values.shape[1:],
                       dtype=np.uint64)
        values = np.concatenate([values, pad])
    for cpu, k in enumerate(cache_keys):
        if k:
            row = values[index[k], cpu]
            np.maximum(row, cache_values[cpu], out=row)
    sums = sum_over_cpus(values)
    headers = values[:, :, 0]
    # The header (isa, vcpu_id) is set on every CPU the thread exited on.
    seen = (headers >> np.uint64(32)) != 0
    header = headers[np.arange(len(keys)), seen.argmax(axis=1)] \
        if len(keys) else headers[:, 0]
    return keys, sums, header


class Snapshot:
    """Counts since tracing began: {(tgid, tid, isa, code): count}, each
    thread's vCPU id, the exits that could not be counted, with --latency
    {(tgid, tid, isa, code): Latency}, and with --detail
    {(tgid, tid, isa, code, kind, key, attr): count} and the sub-keys that
    could not be counted.  TABLES says how each table merges."""

    def __init__(self, counts, vcpu_ids, lost, latency=None, detail=None,
                 detail_lost=0):
        self.counts = counts
        self.vcpu_ids = vcpu_ids
        self.lost = lost
        self.latency = latency or {}
        self.detail = detail or {}
        self.detail_lost = detail_lost

    def minus(self, earlier):
        """The counts of the interval since an earlier snapshot."""
        interval = Snapshot({}, self.vcpu_ids,
                            [a - b for a, b in zip(self.lost, earlier.lost)],
                            detail_lost=self.detail_lost -
                            earlier.detail_lost)
        for table in TABLES:
            then = getattr(earlier, table.name)
            since = {k: table.since(v, then[k]) if k in then else v
                     for k, v in getattr(self, table.name).items()}
            setattr(interval, table.name,
                    {k: v for k, v in since.items() if table.live(v)})
        return interval


def thread_counts(keys, values, cache_keys, cache_values, layout):
    """({(tgid, tid, isa, code): count}, {(tgid, tid): vcpu_id}) from the
    thread table's and the cache slots' per-CPU values, as
    merge_thread_counts() takes them."""
    keys, sums, header = merge_thread_counts(keys, values, cache_keys,
                                             cache_values)
    rows, slots = np.nonzero(sums)
    # The key's parts as columns, zipped in C: a big host has tens of
    # thousands of (thread, reason) rows.
    pid_tgids = np.array(keys, dtype=np.uint64)
    codes = np.array([layout.code(slot) for slot in range(layout.slots)],
                     dtype=np.uint64)
    columns = [(pid_tgids[rows] >> np.uint64(32)).tolist(),
               (pid_tgids[rows] & np.uint64(0xffffffff)).tolist(),
               (header[rows] >> np.uint64(32)).tolist(),
               codes[slots].tolist()]
    counts = dict(zip(zip(*columns), sums[rows, slots].tolist()))
    header = header.tolist()
    vcpu_ids = {(pid_tgid >> 32, pid_tgid & 0xffffffff): h & 0xffffffff
                for pid_tgid, h in zip(keys, header)}
    return counts, vcpu_ids


class TestRunOpts(ctypes.Structure):
    """libbpf's struct bpf_test_run_opts (libbpf 1.x)."""
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p),
                ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
                ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


BPF_F_TEST_RUN_ON_CPU = 1
# Runs of flush_detail on one CPU, each finding an event half done there
# (it takes nanoseconds), before the read gives up.
FLUSH_TRIES = 1000


def flush_details(b):
    """Every online CPU adds its pending --detail counts to detail_counts
    (flush_detail in bpf/kvmexit.bpf.c), so that reading that table misses
    none counted before now.  (BPF_PROG_TEST_RUN runs a raw tracepoint
    program on a chosen CPU since Linux 5.10; --detail needs 5.12.)  Once
    per read, not per retirement tick: each run on another CPU is an IPI,
    which interrupts a guest running there (an exit).  An ended thread's
    counts still pending are added at the next read, and retired at the
    tick after."""
    lib = libbpf()
    lib.bpf_prog_test_run_opts.restype = ctypes.c_int
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int,
                                           ctypes.POINTER(TestRunOpts)]
    try:
        fd = b.load_func(b"flush_detail", bcc.BPF.RAW_TRACEPOINT).fd
    except Exception as e:
        raise Error("cannot load --detail's flush program: %s" % e)
    for cpu in cpu_list(ONLINE_CPUS):
        for _ in range(FLUSH_TRIES):
            opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts),
                               flags=BPF_F_TEST_RUN_ON_CPU, cpu=cpu)
            err = lib.bpf_prog_test_run_opts(fd, ctypes.byref(opts))
            if err:
                raise Error("cannot flush --detail's counts on CPU %d: %s"
                            % (cpu, os.strerror(-err)))
            if opts.retval == 0:
                break
        else:
            raise Error("cannot flush --detail's counts on CPU %d: busy"
                        % cpu)


def snapshot(b, program, ncpus, read_threads=None):
    """Read every map of the program once and sum it up.  read_threads():
    the thread table's (keys, values), if not only the map of that name."""
    layout = program.layout
    # The cache first: see merge_thread_counts().
    _, cache = read_map(b, CACHE_MAP, layout, ncpus,
                        keys=[INDEX_KEY.layout.pack(0)])
    raw_keys, values = read_threads() if read_threads else \
        read_map(b, THREAD_MAP, layout, ncpus)
    counts, vcpu_ids = thread_counts(
        [pid_tgid_of(k) for k in raw_keys], values,
        [int(k) for k in cache[0][:, 0]], cache[0][:, 1:], layout)
    snap = Snapshot(counts, vcpu_ids, [])
    if DETAIL_MAP in program.maps():
        flush_details(b)
    for spec in program.maps():
        if isinstance(spec.merge, Table):
            add_counts(getattr(snap, spec.merge.name),
                       read_entries(b, spec, layout, ncpus))
    snap.lost = read_lost(b, LOST_MAP, layout, ncpus, len(LOST))
    if DETAIL_LOST_MAP in program.maps():
        snap.detail_lost = sum(read_lost(b, DETAIL_LOST_MAP, layout, ncpus,
                                         1))
    return snap


#
# Threads that have exited: retired from the kernel's tables
#
# How often the threads of ended VMs are retired, in seconds.  The thread
# table needs room for the live vCPU threads, one dead thread per possible
# CPU (held in its cache slot until another thread exits there), and the
# threads that ended within one TICK.
TICK = 1.0


class ThreadTables:
    """The loaded program's tables, as retirement reads and prunes them."""

    def __init__(self, b, program, ncpus, meminfo="/proc/meminfo"):
        self.b, self.program, self.ncpus = b, program, ncpus
        self.meminfo = meminfo
        # The thread table's generations (see grow()): the map bcc made,
        # then those added while tracing.
        self.generations = [b[THREAD_MAP.name]]
        self.at_limit = None        # why the table cannot grow, once not
        if "growth" in program.features:
            self.add_generation()   # the free one

    def snapshot(self):
        return snapshot(self.b, self.program, self.ncpus, self.read_threads)

    def read_threads(self, keys=None):
        """(keys, values) of the thread table over its generations; with
        keys, each key's values from the generation that holds it (it is
        in one only: the others leave zeroes)."""
        reads = [read_percpu(table, THREAD_MAP.key.size,
                             THREAD_MAP.words(self.program.layout),
                             self.ncpus, keys=keys)
                 for table in self.generations]
        if len(reads) == 1:
            return reads[0]     # no copy: a big host's table is GiBs
        if keys is not None:
            values = reads[0][1]
            for _, more in reads[1:]:
                values += more
            return keys, values
        return ([k for found, _ in reads for k in found],
                np.concatenate([v for _, v in reads]))

    def capacity(self):
        return sum(table.max_entries for table in self.generations)

    def grow(self):
        """Add a generation twice the size of the newest once a thread has
        entered the newest (it is kept free), if the program has room for
        one and the memory check allows it; returns its size, or None."""
        newest = self.generations[-1]
        if len(self.generations) < 2 or self.at_limit or \
                libbcc.bpf_get_next_key(newest.map_fd, None,
                                        ctypes.create_string_buffer(8)):
            return None         # no growth, or the newest is still empty
        return self.add_generation()

    def add_generation(self):
        size = 2 * self.generations[-1].max_entries
        try:
            if len(self.generations) == GENERATIONS:
                raise Error("all %d generations are in use" % GENERATIONS)
            # The memory check of the start, for the new table alone.
            need = THREAD_MAP.memory(self.program._replace(
                max_threads=size), self.ncpus)
            available = mem_available(self.meminfo)
            if available is not None and need > available // 2:
                raise Error("a table of %d more would take %s of kernel "
                            "memory, more than half of the %s available now"
                            % (size, gib(need), gib(available)))
            fd = create_map(BPF_MAP_TYPE_PERCPU_HASH, THREAD_MAP.key.size,
                            8 * THREAD_MAP.words(self.program.layout), size)
            slot = ctypes.c_int(len(self.generations))
            value = ctypes.c_int(fd)
            if libbcc.bpf_update_elem(self.b[GENERATIONS_MAP.name].map_fd,
                                      ctypes.byref(slot),
                                      ctypes.byref(value), 0):
                os.close(fd)
                raise Error("cannot add a thread table: %s"
                            % os.strerror(ctypes.get_errno()))
        except Error as e:
            self.at_limit = str(e)
            emit("kvmexit: warning: the thread table cannot grow beyond %d "
                 "threads: %s\n" % (self.capacity(), e), sys.stderr)
            return None
        self.generations.append(RawMap(fd, size))
        return size

    def cache_slots(self):
        """([pid_tgid each CPU's cache slot holds, 0: none], their
        counters [cpu][header + slots])."""
        _, cache = read_map(self.b, CACHE_MAP, self.program.layout,
                            self.ncpus, keys=[INDEX_KEY.layout.pack(0)])
        return [int(k) for k in cache[0][:, 0]], cache[0][:, 1:]

    def cached_threads(self):
        """The pid_tgid each CPU's cache slot holds (0: none)."""
        return set(self.cache_slots()[0]) - {0}

    def maps_of(self, spec):
        return self.generations if spec is THREAD_MAP else [self.b[spec.name]]

    def keys(self, spec):
        return [k for table in self.maps_of(spec)
                for k in map_keys(table.map_fd, spec.key.size)]

    def delete(self, spec, keys):
        for table in self.maps_of(spec):
            for key in keys:
                libbcc.bpf_delete_elem(table.map_fd, ctypes.c_char_p(key))

    def take_threads(self, keys):
        """Counts and vCPU ids of these thread table entries, deleted."""
        _, values = self.read_threads(keys)
        counts, vcpu_ids = thread_counts([pid_tgid_of(k) for k in keys],
                                         values, [], None,
                                         self.program.layout)
        self.delete(THREAD_MAP, keys)
        return counts, vcpu_ids

    def take_names(self, spec):
        """{tgid: KernelName} the kernel took (VM_COMM_MAP), deleted."""
        keys, values = read_map(self.b, spec, self.program.layout,
                                self.ncpus)
        self.delete(spec, keys)
        return {spec.key.layout.unpack(k)[0]: kernel_name(v.tobytes())
                for k, v in zip(keys, values)}

    def final_counts(self, keys, slots):
        """Counts and vCPU ids of dead threads that cache slots hold, read
        from their entries and those slots, without deleting anything; the
        keys whose slots could not be read still are left out (tried again
        at the next TICK).

        slots: cache_slots() read after the deaths were seen.  The slots
        are read again after the entries.  A slot is moved out only by an
        eviction, which writes the counters back to the thread's entry,
        then clears the slot's pid_tgid, then loads the next thread's
        counters (program order, which x86 keeps for a reader): a slot
        that still holds the thread at the second read was not being
        evicted during the first read, so the first read is whole, and the
        entry is older than it (merge_thread_counts takes the larger)."""
        first, values = slots
        _, table = self.read_threads(keys)
        second, _ = self.cache_slots()
        wanted = {pid_tgid_of(k) for k in keys}
        moved = {a for a, b in zip(first, second) if a != b} & wanted
        rows = [i for i, k in enumerate(keys)
                if pid_tgid_of(k) not in moved]
        held = [a if a in wanted and a not in moved else 0 for a in first]
        counts, vcpu_ids = thread_counts(
            [pid_tgid_of(keys[i]) for i in rows], table[rows], held, values,
            self.program.layout)
        return [keys[i] for i in rows], counts, vcpu_ids

    def take(self, spec, keys):
        """The entries of these keys of a map that adds to a Snapshot
        table, deleted."""
        entries = read_entries(self.b, spec, self.program.layout,
                               self.ncpus, keys)
        self.delete(spec, keys)
        return entries


#
# VM names: what each VMM's command line calls the VM
#
def qemu_name(value):
    """-name guest=NAME,... or -name NAME,..."""
    params = dict(p.partition("=")[::2] for p in value.split(","))
    return params.get("guest") or value.split(",")[0]


# The flag that names the VM on each VMM's command line, and how to read
# its value (README, "VM names"): QEMU, and libvirt's QEMU, -name;
# Firecracker (and its jailer's) --id.  cloud-hypervisor and crosvm have
# none: their process name stands for the VM.
VM_NAME_FLAGS = {"-name": qemu_name, "--name": qemu_name,
                 "--id": lambda value: value}


def guest_name(argv):
    """The VM's name on its VMM's command line, else None."""
    for flag, value in zip(argv, argv[1:]):
        if flag in VM_NAME_FLAGS:
            return VM_NAME_FLAGS[flag](value)
    return None


class Ident(collections.namedtuple("Ident", "comm guest")):
    """What a VM is called: its process name (comm), and the name its
    VMM's command line gives it (guest_name(); None: none)."""

    __slots__ = ()

    def text(self):
        """As reports show it: 'comm guest=NAME' or 'comm'."""
        return self.comm if self.guest is None else "%s guest=%s" % (
            self.comm, self.guest)

    def label(self):
        """As the `vm` label: the VM's name, else the process name."""
        return self.guest or self.comm


def ident_of(comm, argv):
    """The Ident of a process name and command line (argv: its arguments;
    only complete ones)."""
    guest = guest_name(argv)
    return Ident(printable(comm), None if guest is None else printable(guest))


def process_ident(pid, proc="/proc"):
    """The Ident of a running process, None if it is gone."""
    try:
        comm = read_text("%s/%d/comm" % (proc, pid))
        argv = read_text("%s/%d/cmdline" % (proc, pid)).split("\0")
    except OSError:
        return None
    return ident_of(comm[:-1] if comm.endswith("\n") else comm, argv)


class KernelName(collections.namedtuple("KernelName", "start ident")):
    """A name the kernel took (VM_COMM_MAP): its process's start time, as
    process_start() reads it, and its Ident."""

    __slots__ = ()


def boottime_offset_ns(proc="/proc"):
    """What /proc adds to the kernel's boot times for this process: its
    time namespace's boottime offset (0 in the first one)."""
    try:
        for line in read_text(proc + "/self/timens_offsets").splitlines():
            clock, secs, nsecs = line.split()
            if clock == "boottime":
                return int(secs) * 10 ** 9 + int(nsecs)
    except (OSError, ValueError):
        pass                    # no time namespaces in this kernel
    return 0


def clock_ticks_of(ns):
    """/proc/PID/stat's start time of a task_struct's start_boottime, as
    this process reads it."""
    return (ns + boottime_offset_ns()) // (10 ** 9 //
                                           os.sysconf("SC_CLK_TCK"))


def kernel_name(value):
    """The KernelName of a struct vm_comm.  Its command line is the first
    bytes of /proc/PID/cmdline: an argument it cuts short is left out."""
    start, length, comm, cmdline = VM_COMM.unpack_from(value)
    comm, *argv = (raw.decode("utf-8", "backslashreplace") for raw in
                   [comm.split(b"\0")[0]] + cmdline[:length].split(b"\0"))
    return KernelName(clock_ticks_of(start), ident_of(comm, argv[:-1]))


class Ledger:
    """Final counts of threads that have exited, moved out of the kernel's
    tables so that the threads of new VMs find room there.

    A thread that has exited cannot exit again, so its counts are final.
    retire() moves them here and deletes the thread's entries.  Readers
    take the same lock, so that a report sees each thread once, in the
    tables or here, never twice or not at all.

    A dead thread that a CPU's cache slot still holds is retired all the
    same, at the next TICK (ThreadTables.final_counts says why its counts
    read then are final), but its entry stays: the eviction that takes it
    out of the slot writes its counters back there, and must find it.
    User space cannot clear the slot instead: a per-CPU array's value is
    written for every CPU at once, over the live threads' counters of the
    others.  Until the eviction, which on an idle CPU may never come, the
    thread is `held`: reads subtract what was retired from what the tables
    still show of it, and once no slot holds it its entry is deleted the
    same way, so that nothing is counted twice.  Only the current thread
    enters a cache slot, so a thread found dead and then in no slot never
    enters one again (the slots are read after the deaths are seen: a
    thread that exited, was cached and ended between the two reads would
    be missed the other way round).

    A TID reused by a new thread of the same process continues the old
    thread's entry; subtracting what was retired makes it start from zero
    if the old thread was retired first (within a TICK, the kernel's PIDs
    must wrap around, its exits are counted as the old thread's).  A PID
    reused by a new process (another start time in /proc or in the name
    the kernel took) is a new VM: once its threads are seen in the tables,
    the old one's retired counts and name are dropped (drop_process()), in
    every output, so that the new VM starts from zero under its own name.

    Each process is named (idents) when it is first seen: by the kernel as
    its first thread entered the thread table (VM_COMM_MAP, read first),
    else from /proc while it runs."""

    def __init__(self, proc="/proc", clock=time.monotonic):
        self.lock = threading.Lock()
        self.proc, self.clock = proc, clock
        self.retired = self.empty()     # Snapshot table name: entries
        self.vcpu_ids = {}      # (tgid, tid): vcpu id
        self.gone_since = {}    # tgid: when its process was first missed
        self.tgids = set()      # processes seen in the tables
        self.held = {}          # pid_tgid: {(isa, code): retired count}
        self.starts = {}        # tgid: its process's start time
        self.replaced = set()   # tgids taken by a new process since
        #                         forget_gone() (for the exporter's names)
        self.idents = {}        # tgid: Ident, taken when first seen

    @staticmethod
    def empty():
        return {table.name: {} for table in TABLES}

    def threads_of(self, tgid):
        """The TIDs a process has now (none if it is gone): one directory
        read per process, not one stat per thread."""
        try:
            path = "%s/%d/task" % (self.proc, tgid)
            return {int(t) for t in os.listdir(path)}
        except OSError:
            return set()

    def see(self, tgid, name=None):
        """Note a process seen in the tables (or with retired counts): when
        it started, from /proc or from the KernelName `name`, and what it
        is called, the first time.  If its PID now belongs to a process
        that started later, what the ledger has of the PID is the old
        process's: dropped."""
        start = process_start(tgid, self.proc) if name is None else \
            name.start
        # None: gone when first seen, so any process with its PID is new.
        if tgid in self.starts and start not in (None, self.starts[tgid]):
            self.drop_process(tgid)
        if start is not None or tgid not in self.starts:
            self.starts[tgid] = start
        if tgid not in self.idents:
            ident = process_ident(tgid, self.proc) if name is None else \
                name.ident
            if ident is not None:
                self.idents[tgid] = ident

    def drop_process(self, tgid):
        """Forget the retired counts, vCPU ids and name of a process whose
        PID a new process took."""
        for name, entries in self.retired.items():
            self.retired[name] = {k: v for k, v in entries.items()
                                  if k[0] != tgid}
        self.vcpu_ids = {k: v for k, v in self.vcpu_ids.items()
                         if k[0] != tgid}
        self.idents.pop(tgid, None)
        self.gone_since.pop(tgid, None)
        self.replaced.add(tgid)

    def retire(self, tables):
        """Move the counts of threads that have exited out of the tables;
        returns how many threads were retired."""
        with self.lock:
            return self._retire(tables)

    def _retire(self, tables):
        tids = {}           # tgid: its TIDs now

        def dead(keys):
            found = []
            for key in keys:
                pid_tgid = pid_tgid_of(key)
                tgid = pid_tgid >> 32
                if tgid not in tids:
                    self.see(tgid)
                    tids[tgid] = self.threads_of(tgid)
                if pid_tgid & 0xffffffff not in tids[tgid]:
                    found.append(key)
            return found

        # The kernel's names first: one of a new process with a reused PID
        # drops the old process's counts before the new one's are added.
        for spec in tables.program.maps():
            if spec.merge == "names":
                for tgid, name in tables.take_names(spec).items():
                    self.see(tgid, name)
        retired = 0
        for spec in tables.program.maps():
            if spec.merge == "threads":
                retired = self.retire_threads(tables, dead(tables.keys(spec)))
            elif spec.merge == "pending":
                tables.delete(spec, dead(tables.keys(spec)))
            elif isinstance(spec.merge, Table):
                keys = dead(tables.keys(spec))
                if keys:
                    add_counts(self.retired[spec.merge.name],
                               tables.take(spec, keys))
        self.tgids = set(tids)
        return retired

    def retire_threads(self, tables, threads):
        """Retire these dead threads' thread table entries: taken if no
        cache slot holds them, else read and held (see the class doc)."""
        if not threads:
            return 0
        # The cache slots after the deaths: a thread dead by now enters no
        # slot again, so one found in none stays out.
        slots = tables.cache_slots()
        cached = set(slots[0])
        gone = [k for k in threads if pid_tgid_of(k) not in cached]
        retired = len([k for k in gone if pid_tgid_of(k) not in self.held])
        if gone:
            counts, vcpu_ids = tables.take_threads(gone)
            self.add_threads(counts, vcpu_ids)
            for k in gone:
                self.held.pop(pid_tgid_of(k), None)
        fresh = [k for k in threads if pid_tgid_of(k) in cached and
                 pid_tgid_of(k) not in self.held]
        if fresh:
            keys, counts, vcpu_ids = tables.final_counts(fresh, slots)
            self.add_threads(counts, vcpu_ids)
            for k in keys:
                self.held[pid_tgid_of(k)] = {}
            for (tgid, tid, isa, code), n in counts.items():
                self.held[tgid << 32 | tid][(isa, code)] = n
            retired += len(keys)
        return retired

    def add_threads(self, counts, vcpu_ids):
        """Add taken thread counts, less what was retired of held ones."""
        add_counts(self.retired[COUNTS.name], self.unheld(counts))
        self.vcpu_ids.update((k, v) for k, v in vcpu_ids.items()
                             if (k[0] << 32 | k[1]) not in self.held)

    def unheld(self, counts):
        """Thread counts less what the ledger retired of held threads."""
        if not self.held:
            return counts
        out = {}
        for key, n in counts.items():
            tgid, tid, isa, code = key
            held = self.held.get(tgid << 32 | tid)
            n -= held.get((isa, code), 0) if held is not None else 0
            if n:
                out[key] = n
        return out

    def read(self, tables, take=False):
        """Retire, then a snapshot of the tables with the retired counts
        added.  take: the retired counts leave the ledger with it (a report
        of intervals shows them once); their keys are in .retired."""
        with self.lock:
            self._retire(tables)
            snap = tables.snapshot()
            snap.counts = self.unheld(snap.counts)
            live = {k[:2] for k in snap.counts}
            vcpu_ids = {k: v for k, v in snap.vcpu_ids.items()
                        if k in live or (k[0] << 32 | k[1]) not in self.held}
            merged = Snapshot({}, {**self.vcpu_ids, **vcpu_ids},
                              snap.lost, detail_lost=snap.detail_lost)
            for table in TABLES:
                entries = dict(getattr(snap, table.name))
                add_counts(entries, self.retired[table.name])
                setattr(merged, table.name, entries)
            merged.retired = {name: set(entries)
                              for name, entries in self.retired.items()}
            if take:
                self.retired, self.vcpu_ids = self.empty(), {}
            return merged

    def forget_gone(self, keep):
        """Drop the retired counts of processes gone for `keep` seconds,
        and at once those of a process whose PID a new one took: a
        process that lives on keeps all of its threads' counts, so its
        series never go down.  Returns the tgids dropped, at once or
        since the last call."""
        with self.lock:
            now = self.clock()
            for tgid in {k[0] for entries in self.retired.values()
                         for k in entries}:
                if os.path.exists("%s/%d" % (self.proc, tgid)):
                    self.gone_since.pop(tgid, None)
                    self.see(tgid)
                else:
                    self.gone_since.setdefault(tgid, now)
            expired = {t for t, since in self.gone_since.items()
                       if now - since >= keep}
            replaced, self.replaced = self.replaced, set()
            if expired:
                drop = lambda table: {k: v for k, v in table.items()
                                      if k[0] not in expired}
                self.retired = {name: drop(entries)
                                for name, entries in self.retired.items()}
                self.vcpu_ids = drop(self.vcpu_ids)
                for tgid in expired:
                    del self.gone_since[tgid]
                    self.starts.pop(tgid, None)
                    self.idents.pop(tgid, None)
            return expired | set(replaced)

    def size(self):
        """Entries held: what grows with the VMs that came and went."""
        return sum(map(len, self.retired.values())) + len(self.vcpu_ids)


def without_retired(snap):
    """An interval report has shown the retired counts: the next interval
    starts from zero for their keys (a reused TID is a new thread)."""
    for name, keys in snap.retired.items():
        entries = getattr(snap, name)
        for k in keys:
            entries.pop(k, None)
    return snap


#
# Report
#
def limit_per_group(rows, top):
    """The first `top` rows of each group (rows are sorted by group)."""
    if not top:
        return rows
    kept, seen = [], {}
    for row in rows:
        seen[row[0]] = seen.get(row[0], 0) + 1
        if seen[row[0]] <= top:
            kept.append(row)
    return kept


def ordered_rows(counts, group, top=None):
    """The one row order of every report, text and records alike:
    [(group, isa, code, count)], groups ascending, each group's reasons by
    count, largest first, then by exit code; at most `top` per group.

    counts: {(tgid, tid, isa, code): count}; group(tgid, tid): the block a
    thread's rows go to (None: one block for all)."""
    merged = merge_by(counts, lambda tgid, tid, isa, code:
                      (group(tgid, tid), isa, code))
    # Sorted as plain tuples: no key function, for speed at scale.
    order = sorted((g or (), -n, isa, code)
                   for (g, isa, code), n in merged.items())
    return limit_per_group([(g or None, isa, code, -n)
                            for g, n, isa, code in order], top)


def report_rows(selection, snap, top=None):
    """The rows of the text report of a selection's view."""
    return ordered_rows(selection.keep(snap.counts, snap.vcpu_ids),
                        selection.group, top)


def process_name(pid, proc="/proc"):
    """The process name, with the VM's name when its VMM gives one."""
    ident = process_ident(pid, proc)
    return "?" if ident is None else ident.text()


def isa_name(isa):
    return ISA_BY_CODE[isa].name if isa in ISA_BY_CODE else str(isa)


class ReportOptions(collections.namedtuple("ReportOptions", (
        "interval timestamp cumulative json csv comm show_vcpu top latency "
        "detail"), defaults=(None,) * 10)):
    """The options that shape a report, taken once from the arguments."""

    __slots__ = ()

    @classmethod
    def of(cls, args):
        return cls(**{name: getattr(args, name) for name in cls._fields})


class Report:
    """What the text and record reports share: the selection, reason
    names, options (ReportOptions), and the process names (taken once)."""

    def __init__(self, selection, names, opts=None, out=None):
        self.selection, self.names = selection, names
        self.opts = opts or ReportOptions()
        self.out = out or sys.stdout
        self.comms = {}         # pid: name read from /proc, once
        self.idents = {}        # tgid: Ident, as the Ledger took it

    def comm(self, pid):
        """The Ledger's name of the process (it changes if a new process
        takes the PID), else the one read from /proc when first asked."""
        ident = self.idents.get(pid)
        if ident is not None:
            return ident.text()
        if pid not in self.comms:
            ident = process_ident(pid)
            self.comms[pid] = "?" if ident is None else ident.text()
        return self.comms[pid]

    def write(self, text):
        emit(text, self.out)


LATENCY_COLUMNS = ("AVG_us",) + tuple("P%d_us" % p for p in PERCENTILES) + \
    ("MAX_us",)


def latency_ns(lat):
    """The latency columns of a row, in ns: average, percentiles, max."""
    return [lat.avg_ns()] + lat.percentiles_ns() + [lat.max_ns]


class TextReport(Report):
    """bcc's kvmexit output: a header, then '%-8u' ids, '%-35s' reason and
    '%-8u' count per row; the options add columns after bcc's."""

    def columns(self):
        return self.selection.columns(self.opts.comm,
                                      self.opts.show_vcpu)

    def header(self):
        ids = "".join(col.header() for col in self.columns())
        if self.opts.latency:
            return "%s%-35s %-8s %s" % (
                ids, "KVM_EXIT_REASON", "COUNT", " ".join(
                    "%10s" % c for c in LATENCY_COLUMNS))
        return "%s%-35s %s" % (ids, "KVM_EXIT_REASON", "COUNT")

    def vcpu_cell(self, tgid, tid):
        vcpu = self.snap.vcpu_ids.get((tgid, tid), VCPU_ID_UNKNOWN)
        return "-" if vcpu == VCPU_ID_UNKNOWN else vcpu

    def id_cells(self, group, tgid_of_tid):
        if group is None:
            return ""
        tgid, tid = group if len(group) == 2 else (tgid_of_tid.get(group[0]),
                                                   group[0])
        return "".join(col.text(col.cell(self, tgid, tid))
                       for col in self.columns())

    def report(self, snap, start, end):
        self.snap = snap
        head = "\n" if self.opts.interval else ""
        if self.opts.timestamp:
            head += time.strftime("%H:%M:%S\n", time.localtime(end))
        lines = [head + self.header() + "\n"]
        tgid_of_tid = {k[1]: k[0] for k in snap.counts}
        latency = merge_by(self.selection.keep(snap.latency, snap.vcpu_ids),
                           lambda tgid, tid, isa, code:
                           (self.selection.group(tgid, tid), isa, code)) \
            if self.opts.latency else None
        subs = detail_rows(self.selection.keep(snap.detail, snap.vcpu_ids),
                           self.selection.group, self.opts.top) \
            if self.opts.detail else {}
        cells_of, name_of = {}, {}
        for group, isa, code, count in report_rows(self.selection, snap,
                                                   self.opts.top):
            cells = cells_of.get(group)
            if cells is None:       # once per thread, not once per row
                cells = cells_of[group] = self.id_cells(group, tgid_of_tid)
            name = name_of.get((isa, code))
            if name is None:
                name = name_of[(isa, code)] = self.names.name(isa, code)
            line = "%s%-35s %-8u" % (cells, name, count)
            if latency is not None:
                lat = latency.get((group, isa, code))
                line += " " + " ".join(
                    "%10.1f" % (ns / 1e3) for ns in latency_ns(lat)) \
                    if lat else " " + " ".join(
                        "%10s" % "-" for _ in LATENCY_COLUMNS)
            lines.append(line + "\n")
            # Under its reason, indented, in the reason's and count's columns.
            lines.extend("%s  %-33s %-8u\n" % (" " * len(cells),
                                               detail.label(), n)
                         for detail, n in subs.get((group, isa, code), ()))
        self.write("".join(lines))


class RecordReport(Report):
    """--json and --csv: one record per (thread, reason), whatever the
    view, so that consumers can group as they like."""

    FIELDS = ("pid", "tid", "vcpu_id", "comm", "isa", "exit_code", "name",
              "count")
    LATENCY_FIELDS = ("avg_ns",) + tuple(
        "p%d_ns" % p for p in PERCENTILES) + ("max_ns",)
    # --csv --detail: a reason's row is followed by one row per sub-key,
    # with the same ids, the sub-key's count, and these filled in.
    DETAIL_FIELDS = ("detail_kind", "detail_key", "detail_op",
                     "detail_size", "detail_name")

    def __init__(self, selection, names, probe, opts, out=None):
        super().__init__(selection, names, opts, out)
        self.probe = probe
        self.header_done = False

    def records(self, snap):
        keep = lambda table: self.selection.keep(table, snap.vcpu_ids)
        latency = keep(snap.latency)
        subs = detail_rows(keep(snap.detail), lambda tgid, tid: (tgid, tid),
                           self.opts.top) \
            if self.opts.detail else {}
        for (tgid, tid), isa, code, count in ordered_rows(
                keep(snap.counts), lambda tgid, tid: (tgid, tid),
                self.opts.top):
            vcpu = snap.vcpu_ids.get((tgid, tid), VCPU_ID_UNKNOWN)
            record = {"pid": tgid, "tid": tid,
                      "vcpu_id": None if vcpu == VCPU_ID_UNKNOWN else vcpu,
                      "comm": self.comm(tgid), "isa": isa_name(isa),
                      "exit_code": code, "name": self.names.name(isa, code),
                      "count": count}
            if self.opts.latency:
                # None (null, empty in CSV) where the vCPU never re-entered
                # after such an exit, e.g. its last HLT.
                lat = latency.get((tgid, tid, isa, code))
                times = latency_ns(lat) if lat else [None] * len(
                    self.LATENCY_FIELDS)
                if lat:
                    times[0] = round(times[0])
                record.update(zip(self.LATENCY_FIELDS, times))
            if self.opts.detail:
                record["detail"] = [detail_record(d, n) for d, n in
                                    subs.get(((tgid, tid), isa, code), ())]
            yield record

    def report(self, snap, start, end):
        if self.opts.json:
            self.write(json.dumps({
                "context": self.selection.context,
                "view": self.selection.view,
                "probe": self.probe.kind,
                "start": round(start, 6), "end": round(end, 6),
                "cumulative": bool(self.opts.cumulative),
                "rows": list(self.records(snap)),
                "lost": sum(snap.lost),
                **({"detail_lost": snap.detail_lost}
                   if self.opts.detail else {})}) + "\n")
            return
        fields = ("end",) + self.FIELDS + (
            self.LATENCY_FIELDS if self.opts.latency else ()) + (
            self.DETAIL_FIELDS if self.opts.detail else ())
        text = io.StringIO()
        writer = csv.DictWriter(text, fields, lineterminator="\n")
        if not self.header_done:
            writer.writeheader()
            self.header_done = True
        for record in self.records(snap):
            record["end"] = "%.6f" % end
            details = record.pop("detail", ())
            writer.writerow(record)
            for sub in details:
                writer.writerow(self.csv_detail_row(record, sub))
        self.write(text.getvalue())

    def csv_detail_row(self, record, sub):
        row = {k: record[k] for k in ("end",) + self.FIELDS}
        row["count"] = sub["count"]
        row.update(("detail_" + k, sub[k])
                   for k in ("kind", "key", "op", "size", "name"))
        return row


def warn_lost(snap):
    for count, why in zip(snap.lost, LOST_REASONS):
        if count:
            emit("kvmexit: warning: %d exits were not counted: %s\n"
                 % (count, why), sys.stderr)
    if snap.detail_lost:
        emit("kvmexit: warning: %d --detail sub-keys were not counted: the "
             "detail table was full (their exits are counted)\n"
             % snap.detail_lost, sys.stderr)


#
# --prometheus: /metrics for a Prometheus server
#
# Histogram edges, as log2(ns): every other power of two from 256 ns to
# ~17 s.  Each is where a bucket of the in-kernel log-linear histogram
# begins, so the count below each edge is exact.
LATENCY_EDGES = tuple(range(8, 35, 2))


def lost_label(macro):
    """The `why` label of a LOST_* reason: LOST_RARE_TABLE_FULL ->
    rare_table_full."""
    return macro[len("LOST_"):].lower()


def vm_label(pid, proc="/proc"):
    """The `vm` label: the VM's name, else the process name; None if the
    process is gone."""
    ident = process_ident(pid, proc)
    return None if ident is None else ident.label()


class VmNames:
    """The `vm` label of each process, as the Ledger took it when the
    process was first seen (idents), else read now, so that a VM that has
    ended keeps its name for as long as its series are served."""

    def __init__(self, proc="/proc", idents=None):
        self.proc = proc
        self.names = {}
        self.idents = {} if idents is None else idents

    def note(self, tgids):
        for tgid in tgids:
            if tgid not in self.names:
                self.names[tgid] = self.read(tgid)

    def read(self, tgid):
        ident = self.idents.get(tgid)
        if ident is not None:
            return ident.label()
        return vm_label(tgid, self.proc) or "?"

    def get(self, tgid):
        """The name, read now if never read: "?" if the process is gone
        and was never seen.  The Ledger's first: a new process that took
        the PID has its own."""
        ident = self.idents.get(tgid)
        if ident is not None:
            return ident.label()
        name = self.names.get(tgid)
        if name is None:
            name = self.names[tgid] = self.read(tgid)
        return name

    def forget(self, tgids):
        for tgid in tgids:
            self.names.pop(tgid, None)


def histogram_buckets(lat):
    """[(le in seconds, count below it)] at LATENCY_EDGES, then +Inf."""
    return [(str(2 ** edge / 1e9), sum(lat.hist[:latency_bucket(1 << edge)]))
            for edge in LATENCY_EDGES] + [("+Inf", lat.count)]


def import_prometheus_client():
    """prometheus_client, imported for --prometheus only: a missing or
    broken one does not stop a printed report."""
    global prometheus_client
    if prometheus_client is None:
        try:
            import prometheus_client as client
            import prometheus_client.core
            import prometheus_client.exposition
        except ImportError:
            raise Error("--prometheus needs the Python module "
                        "prometheus_client (install "
                        "python3-prometheus-client)")
        except Exception as e:
            raise Error("prometheus_client failed to import: %s: %s: "
                        "reinstall python3-prometheus-client"
                        % (type(e).__name__,
                           (str(e).splitlines() or ["?"])[0]))
        prometheus_client = client
    return prometheus_client


#
# Self-metrics: kvmexit's own tables and programs, read through libbcc
#
BPF_HASH_TYPES = {1: "hash", 5: "percpu_hash", 9: "lru_hash",
                  10: "lru_percpu_hash"}
BPF_STATS_ENABLED = "/proc/sys/kernel/bpf_stats_enabled"
# struct bpf_prog_info (linux/bpf.h): where run_time_ns and run_cnt are
# (Linux 5.1+), and a size that holds them.
PROG_INFO_SIZE = 232
PROG_INFO_RUN_STATS = struct.Struct("<QQ")
PROG_INFO_RUN_STATS_OFF = 192


def bcc_native():
    """libbcc with the prototypes of the calls made here (a handle of our
    own, so that bcc's declarations are left as bcc set them)."""
    lib = ctypes.CDLL(libbcc._name)
    size_t, prog = ctypes.c_size_t, ctypes.c_void_p
    for name, restype, argtypes in (
            ("bpf_num_tables", size_t, [prog]),
            ("bpf_table_name", ctypes.c_char_p, [prog, size_t]),
            ("bpf_table_fd_id", ctypes.c_int, [prog, size_t]),
            ("bpf_table_type_id", ctypes.c_int, [prog, size_t]),
            ("bpf_table_max_entries_id", size_t, [prog, size_t]),
            ("bpf_table_key_size_id", size_t, [prog, size_t]),
            ("bpf_get_next_key", ctypes.c_int,
             [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
            ("bpf_obj_get_info", ctypes.c_int,
             [ctypes.c_int, ctypes.c_void_p,
              ctypes.POINTER(ctypes.c_uint32)])):
        func = getattr(lib, name)
        func.restype, func.argtypes = restype, argtypes
    return lib


def bpf_stats_enabled():
    try:
        return read_text(BPF_STATS_ENABLED).strip() == "1"
    except OSError:
        return False


class BpfSelf:
    """What kvmexit's BPF object holds: the fill of its hash tables and,
    when kernel.bpf_stats_enabled is 1, its programs' run time and count."""

    def __init__(self, b, tables=None):
        self.b, self.lib = b, bcc_native()
        self.thread_tables = tables     # ThreadTables: its generations
        self.tables = []        # (name, fd, key size, max entries)
        for i in range(self.lib.bpf_num_tables(b.module)):
            if self.lib.bpf_table_type_id(b.module, i) in BPF_HASH_TYPES:
                self.tables.append((
                    self.lib.bpf_table_name(b.module, i).decode(),
                    self.lib.bpf_table_fd_id(b.module, i),
                    self.lib.bpf_table_key_size_id(b.module, i),
                    self.lib.bpf_table_max_entries_id(b.module, i)))

    def entries(self, fd, key_size):
        """Keys in a hash table, walked without reading the values."""
        n, bufs = 0, (ctypes.create_string_buffer(key_size),
                      ctypes.create_string_buffer(key_size))
        key = None
        while self.lib.bpf_get_next_key(fd, key, bufs[n % 2]) == 0:
            key = bufs[n % 2]
            n += 1
        return n

    def table_fill(self):
        """[(table, entries, capacity)] of the hash tables; the thread
        table's over its generations."""
        fill = []
        for name, fd, key_size, capacity in self.tables:
            entries = self.entries(fd, key_size)
            if self.thread_tables and name == THREAD_MAP.name.decode():
                more = self.thread_tables.generations[1:]
                entries += sum(self.entries(t.map_fd, key_size)
                               for t in more)
                capacity = self.thread_tables.capacity()
            fill.append((name, entries, capacity))
        return fill

    def run_stats(self):
        """[(program, run seconds, runs)]: the kernel accounts them while
        kernel.bpf_stats_enabled is 1 (or a BPF_ENABLE_STATS holder keeps
        them on), so [] while it is off and they never ran accounted."""
        stats = []
        for name, func in sorted(self.b.funcs.items()):
            info = ctypes.create_string_buffer(PROG_INFO_SIZE)
            size = ctypes.c_uint32(PROG_INFO_SIZE)
            if self.lib.bpf_obj_get_info(func.fd, info, ctypes.byref(size)) \
                    or size.value < PROG_INFO_RUN_STATS_OFF + 16:
                continue
            ns, runs = PROG_INFO_RUN_STATS.unpack_from(
                info.raw, PROG_INFO_RUN_STATS_OFF)
            stats.append((name.decode() if isinstance(name, bytes) else name,
                          ns / 1e9, runs))
        if any(runs for _, _, runs in stats) or bpf_stats_enabled():
            return stats
        return []


# --detail's series: the sub-keys kept per VM (and vCPU) and exit reason,
# and how their key label is written (as in the text report).
DETAIL_SERIES_PER_REASON = 16
DETAIL_KEY_FORMAT = {"port": "0x%x", "msr": "0x%x", "page": "0x%x",
                     "mmio": "0x%x", "vector": "%d", "cr": "%d",
                     "hypercall": "%d", "user": "%d", "wfx": "%d",
                     "smccc": "0x%x", "sysreg": sysreg_encoding,
                     "ipa": "0x%x"}


def detail_key_text(detail):
    fmt = DETAIL_KEY_FORMAT[detail.kind]
    return fmt(detail.key) if callable(fmt) else fmt % detail.key


DETAIL_SUB_LABELS = ("kind", "key", "op", "name")


def detail_labels(detail):
    """DETAIL_SUB_LABELS' values of a decoded sub-key."""
    return (detail.kind, detail_key_text(detail),
            detail.op or "", detail.name or "")


class DetailSeries:
    """kvm_exit_details_total's series: at most `bound` sub-keys per VM
    (and vCPU) and reason.  A sub-key once served stays served (a counter
    must not vanish while its VM lives) and the first ones seen take the
    room; the exits of the others are served as dropped, a sum that only
    grows since both the counts and the kept set do."""

    def __init__(self, bound=DETAIL_SERIES_PER_REASON):
        self.bound = bound
        self.kept = {}          # (vm labels, reason): {sub-key labels}

    def series(self, merged):
        """merged: {(group labels, sub-key labels): count}, group labels
        ending with the reason.  Returns ({labels: count} kept,
        {group labels: count} dropped)."""
        kept, dropped = {}, {}
        for (group, sub), n in sorted(merged.items(),
                                      key=lambda kv: (-kv[1], kv[0])):
            room = self.kept.setdefault(group, set())
            if sub in room or len(room) < self.bound:
                room.add(sub)
                kept[group + sub] = n
            else:
                dropped[group] = dropped.get(group, 0) + n
        groups = {group for group, _ in merged}
        for group in set(self.kept) - groups:
            del self.kept[group]            # its VM is gone
        return kept, dropped


class Exporter:
    """A prometheus_client collector: each scrape reads the tables (after
    retiring the threads that ended) and yields one series per VM, vCPU
    and exit reason, summed over the VM's threads for that vCPU, then
    kvmexit's own figures."""

    LABELS = SERIES_LABELS

    def __init__(self, read, names, selection, vm_names, latency, build,
                 bpf_self=None, labels=SERIES_LABELS, latency_labels=None,
                 detail=False):
        import_prometheus_client()
        self.read, self.names = read, names
        self.selection, self.vm_names = selection, vm_names
        self.latency, self.build = latency, build
        self.bpf_self = bpf_self
        self.labels = labels
        self.latency_labels = latency_labels or labels
        # --detail's: the VM, the vCPU if the counters keep it, the reason.
        self.detail_labels = tuple(
            label for label in SERIES_LABELS
            if label in ("vm", "reason") or
            (label == "vcpu" and label in labels))
        self.detail, self.details = detail, DetailSeries()
        self.errors = 0
        self.lock = threading.Lock()

    def families(self):
        """The metric families, empty: what describe() names (so that
        /metrics?name[]=... finds them) and what collect() fills."""
        core = prometheus_client.core
        return {
            "exits": core.CounterMetricFamily(
                "kvm_exits", "VM exits by VM, vCPU and exit reason",
                labels=self.labels),
            "lost": core.CounterMetricFamily(
                "kvmexit_lost_exits", "VM exits that kvmexit could not "
                "count", labels=("why",)),
            "latency": core.HistogramMetricFamily(
                "kvm_exit_handling_seconds", "Time from a VM exit until its "
                "vCPU enters the guest again", labels=self.latency_labels),
            "details": core.CounterMetricFamily(
                "kvm_exit_details", "VM exits by VM, exit reason and what "
                "caused them (--detail)",
                labels=self.detail_labels + DETAIL_SUB_LABELS),
            "details_dropped": core.CounterMetricFamily(
                "kvm_exit_details_dropped", "VM exits with a sub-key beyond "
                "the %d served per VM and reason" % self.details.bound,
                labels=self.detail_labels),
            "details_lost": core.CounterMetricFamily(
                "kvmexit_detail_lost", "Sub-keys the kernel could not "
                "count for lack of room (their exits are counted)"),
            "build": core.InfoMetricFamily(
                "kvmexit_build", "kvmexit's version and how it counts",
                labels=sorted(self.build)),
            "duration": core.GaugeMetricFamily(
                "kvmexit_collect_duration_seconds", "How long this scrape "
                "took to read kvmexit's tables"),
            "errors": core.CounterMetricFamily(
                "kvmexit_collect_errors", "Scrapes that could not read "
                "kvmexit's tables"),
            "entries": core.GaugeMetricFamily(
                "kvmexit_table_entries", "Entries in each of kvmexit's "
                "kernel hash tables", labels=("table",)),
            "capacity": core.GaugeMetricFamily(
                "kvmexit_table_capacity", "Entries each of kvmexit's kernel "
                "hash tables has room for", labels=("table",)),
            "at_limit": core.GaugeMetricFamily(
                "kvmexit_thread_table_at_limit", "1 once the thread table "
                "could not grow (the memory check or its generations)"),
            "run_seconds": core.CounterMetricFamily(
                "kvmexit_bpf_run_seconds", "Time kvmexit's BPF programs ran "
                "while kernel.bpf_stats_enabled was 1",
                labels=("program",)),
            "runs": core.CounterMetricFamily(
                "kvmexit_bpf_runs", "Runs of kvmexit's BPF programs while "
                "kernel.bpf_stats_enabled was 1", labels=("program",)),
        }

    def describe(self):
        # Names only: nothing is read at registration.
        return [f for key, f in self.families().items()
                if (key != "latency" or self.latency) and
                (not key.startswith("details") or self.detail)]

    def collect(self):
        f = self.families()
        started = time.monotonic()
        try:
            snap = self.read()
        except (Error, OSError) as e:
            snap = None
            with self.lock:
                self.errors += 1
            emit("kvmexit: warning: a scrape could not read the tables: %s\n"
                 % e, sys.stderr)
        if snap is not None:
            yield from self.counts(f, snap)
        f["duration"].add_metric((), time.monotonic() - started)
        f["errors"].add_metric((), self.errors)
        f["build"].add_metric((), self.build)
        yield from (f["build"], f["duration"], f["errors"])
        yield from self.self_metrics(f)

    def counts(self, f, snap):
        # kvm_exits_total's samples stay one dict (as --detail's do): a big
        # host has tens of thousands of series, written by exposition()
        # straight from it.
        exits = f["exits"]
        exits.samples = SeriesSamples(
            exits.name + "_total", self.labels,
            self.series(snap, snap.counts, self.labels))
        yield exits
        for (macro, _), n in zip(LOST, snap.lost):
            f["lost"].add_metric((lost_label(macro),), n)
        yield f["lost"]
        if self.latency:
            for labels, lat in self.series(snap, snap.latency,
                                           self.latency_labels).items():
                f["latency"].add_metric(labels, histogram_buckets(lat),
                                        lat.total_ns / 1e9)
            yield f["latency"]
        if self.detail:
            yield from self.detail_metrics(f, snap)

    def detail_metrics(self, f, snap):
        """kvm_exit_details_total: each (VM[, vCPU], reason)'s sub-keys,
        at most DetailSeries' bound of them, and what the bound and the
        kernel's table dropped."""
        merged, groups, subs = {}, {}, {}
        keep = self.detail_labels
        for key, n in self.selection.keep(snap.detail,
                                          snap.vcpu_ids).items():
            tgid, tid, isa, code, kind, sub, attr = key
            group = groups.get(key[:4])
            if group is None:
                vcpu = snap.vcpu_ids.get((tgid, tid), VCPU_ID_UNKNOWN)
                values = {"vm": self.vm_names.get(tgid),
                          "vcpu": "unknown" if vcpu == VCPU_ID_UNKNOWN
                          else str(vcpu),
                          "reason": self.names.name(isa, code)}
                group = groups[key[:4]] = tuple(values[label]
                                                for label in keep)
            labels = subs.get(key[2:])
            if labels is None:
                labels = subs[key[2:]] = detail_labels(
                    decode_detail(isa, code, kind, sub, attr))
            merged[(group, labels)] = merged.get((group, labels), 0) + n
        kept, dropped = self.details.series(merged)
        for family, series, labels in (
                (f["details"], kept, keep + DETAIL_SUB_LABELS),
                (f["details_dropped"], dropped, keep)):
            family.samples = SeriesSamples(family.name + "_total", labels,
                                           series)
        f["details_lost"].add_metric((), snap.detail_lost)
        yield from (f["details"], f["details_dropped"], f["details_lost"])

    def self_metrics(self, f):
        if self.bpf_self is None:
            return
        for table, entries, capacity in self.bpf_self.table_fill():
            f["entries"].add_metric((table,), entries)
            f["capacity"].add_metric((table,), capacity)
        yield from (f["entries"], f["capacity"])
        tables = self.bpf_self.thread_tables
        if tables is not None:
            f["at_limit"].add_metric((), 1 if tables.at_limit else 0)
            yield f["at_limit"]
        stats = self.bpf_self.run_stats()
        for program, seconds, runs in stats:
            f["run_seconds"].add_metric((program,), seconds)
            f["runs"].add_metric((program,), runs)
        if stats:
            yield from (f["run_seconds"], f["runs"])

    def series(self, snap, table, keep=SERIES_LABELS):
        """{labels: value} of a snapshot table, summed over what the
        labels `keep` leave out (at least over a VM's threads of one
        vCPU), so that no two series have the same labels.  Labels are
        made once per thread and per reason, not per row: a big host has
        tens of thousands of rows."""
        merged, thread_labels, reason_labels = {}, {}, {}
        pick = lambda values, names: tuple(
            v for v, name in zip(values, names) if name in keep)
        for (tgid, tid, isa, code), v in self.selection.keep(
                table, snap.vcpu_ids).items():
            thread = thread_labels.get((tgid, tid))
            if thread is None:
                vcpu = snap.vcpu_ids.get((tgid, tid), VCPU_ID_UNKNOWN)
                thread = thread_labels[(tgid, tid)] = pick((
                    self.vm_names.get(tgid), str(tgid),
                    "unknown" if vcpu == VCPU_ID_UNKNOWN else str(vcpu)),
                    SERIES_LABELS[:3])
            reason = reason_labels.get((isa, code))
            if reason is None:
                reason = reason_labels[(isa, code)] = pick((
                    isa_name(isa), self.names.name(isa, code)),
                    SERIES_LABELS[3:])
            labels = thread + reason
            merged[labels] = merged[labels] + v if labels in merged else v
        return merged


#
# The exposition of kvm_exits_total, written here: prometheus_client makes
# a Sample and a sorted label dict per series, half of a big host's scrape.
# Its formats are kept byte for byte (tests/test_exposition.py compares).
#
class SeriesSamples:
    """A counter's samples as {label values: count}.  prometheus_client
    reads them as its Samples (made when iterated: generate_latest, the
    name[] filter); exposition() writes their lines from the dict."""

    def __init__(self, name, labels, series):
        self.name, self.labels, self.series = name, labels, series

    def __iter__(self):
        sample, name, keep = prometheus_client.core.Sample, self.name, \
            self.labels
        return (sample(name, dict(zip(keep, values)), n)
                for values, n in self.series.items())

    def __len__(self):
        return len(self.series)

    def text(self):
        """The sample lines: labels sorted by name, as the formats want
        (there is always one: the reason)."""
        order = sorted(range(len(self.labels)), key=self.labels.__getitem__)
        line = "%s{%s} %%s\n" % (self.name, ",".join(
            '%s="%%s"' % self.labels[i] for i in order))
        # One tuple per line, its values in the line's order, picked and
        # formatted in C: a big host has tens of thousands of lines.  (An
        # extra item, cut off, so that one label still gives a tuple.)
        pick = operator.itemgetter(*order, 0)
        return "".join(line % (pick(values)[:-1] + (count_text(n),))
                       for values, n in escaped(self.series).items())


def escaped(series):
    """series with its label values escaped: as it is when none needs it
    (a VM name with a quote, a backslash or a newline is rare)."""
    values = set(itertools.chain.from_iterable(series))
    change = {v: label_escape(v) for v in values if label_escape(v) != v}
    if not change:
        return series
    return {tuple(change.get(v, v) for v in labels): n
            for labels, n in series.items()}


def label_escape(value):
    """A label value in the text formats: backslash, newline and double
    quote escaped with a backslash."""
    return value.replace("\\", "\\\\").replace("\n", "\\n") \
        .replace('"', '\\"')


def count_text(n):
    """A count (an int >= 0) as the formats write a value: as a float, in
    Go's notation, so that a count of a million or more has an exponent
    (1e+06) and one beyond 2**53 is rounded like any float."""
    if n < 1000000:
        return "%d.0" % n
    text = repr(float(n))
    if not text.endswith(".0"):
        return text                     # 1e+16 and beyond: Python's form
    digits = text[:-2]                  # 1234567.0: 1.234567e+06
    mantissa = (digits[0] + "." + digits[1:]).rstrip("0").rstrip(".")
    return "%se+0%d" % (mantissa, len(digits) - 1)


class Families:
    """Some collected families, as the registry prometheus_client's
    writers read."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def exposition(registry, openmetrics=False):
    """/metrics's body, in the text format 0.0.4 or OpenMetrics: the
    families whose samples are SeriesSamples written here, the others by
    prometheus_client, in the order the registry gives them."""
    client = prometheus_client.exposition
    write = client.openmetrics.generate_latest if openmetrics \
        else client.generate_latest
    eof = b"# EOF\n" if openmetrics else b""
    chunks, theirs = [], []

    def flush():
        if theirs:
            text = write(Families(theirs))
            chunks.append(text[:len(text) - len(eof)])
            del theirs[:]
    for family in registry.collect():
        if isinstance(family.samples, SeriesSamples):
            flush()
            chunks.append(family_header(family, openmetrics) +
                          family.samples.text().encode())
        else:
            theirs.append(family)
    flush()
    return b"".join(chunks) + eof


def family_header(family, openmetrics):
    """A counter's HELP and TYPE lines: the text format names it with its
    _total and escapes no quote in the help, OpenMetrics does both the
    other way."""
    doc = family.documentation.replace("\\", "\\\\").replace("\n", "\\n")
    name = family.name
    if openmetrics:
        doc = doc.replace('"', '\\"')
    else:
        name += "_total"
    return ("# HELP %s %s\n# TYPE %s counter\n" % (name, doc, name)).encode()


def metrics_app(registry):
    """prometheus_client's WSGI app, with /metrics written by exposition():
    the same format chosen by the Accept header, the same gzip; what it
    serves otherwise (a name[] filter, /favicon.ico) it still serves."""
    theirs = prometheus_client.make_wsgi_app(registry)
    client = prometheus_client.exposition

    def app(environ, start_response):
        params = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        if environ["PATH_INFO"] == "/favicon.ico" or "name[]" in params:
            return theirs(environ, start_response)
        write, content_type = client.choose_encoder(
            environ.get("HTTP_ACCEPT"))
        body = exposition(registry, write is not client.generate_latest)
        headers = [("Content-Type", content_type)]
        if client.gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING")):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]
    return app


#
# --web.config.file: TLS and basic auth, in the format of Prometheus'
# exporter-toolkit (the file node_exporter reads), so one file serves both
#
WEB_CONFIG_KEYS = {
    "tls_server_config": ("cert_file", "key_file", "client_ca_file",
                          "client_auth_type", "min_version", "max_version",
                          "prefer_server_cipher_suites", "cipher_suites",
                          "curve_preferences", "client_allowed_sans",
                          "cert", "key", "client_ca"),
    "http_server_config": ("http2", "headers"),
    "basic_auth_users": None,       # user: bcrypt hash
}
# Keys of the format this server cannot honour.  Refused, not ignored: a
# file that relies on one would be taken for safer than it is.
WEB_UNSUPPORTED = {
    "cipher_suites": "OpenSSL chooses the suites (Go's names do not apply)",
    "curve_preferences": "OpenSSL chooses the curves",
    "client_allowed_sans": "client certificates are verified, not matched "
                           "by name",
    "cert": "give the certificate as cert_file",
    "key": "give the key as key_file",
    "client_ca": "give the CA as client_ca_file",
}
TLS_VERSIONS = {"TLS10": "TLSv1", "TLS11": "TLSv1_1", "TLS12": "TLSv1_2",
                "TLS13": "TLSv1_3"}
# client_auth_type -> ssl verify mode.  RequestClientCert asks for a
# certificate and lets any (or none) through, which for access is no client
# certificate at all.  RequireAnyClientCert (any certificate, unverified)
# has no equivalent in Python's ssl.
CLIENT_AUTH = {"": "CERT_NONE", "NoClientCert": "CERT_NONE",
               "RequestClientCert": "CERT_NONE",
               "VerifyClientCertIfGiven": "CERT_OPTIONAL",
               "RequireAndVerifyClientCert": "CERT_REQUIRED"}
# Response headers the format allows in http_server_config.headers.
WEB_HEADERS = ("Strict-Transport-Security", "X-Content-Type-Options",
               "X-Frame-Options", "X-XSS-Protection",
               "Content-Security-Policy")
BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$"
                         r"[./A-Za-z0-9]{53}")


class WebConfig:
    """What --web.config.file asks for: an ssl.SSLContext or None (plain
    HTTP), {user: bcrypt hash} (empty: no auth), extra response headers."""

    # Right passwords remembered, so that a scraper every few seconds does
    # not cost a bcrypt check (~0.1 s at cost 10) each time; wrong ones
    # always cost one.
    MAX_REMEMBERED = 64

    def __init__(self, tls=None, users=None, headers=()):
        self.tls, self.users, self.headers = tls, users or {}, list(headers)
        self.dummy = None
        self.secret, self.remembered = os.urandom(32), set()

    @property
    def protected(self):
        return self.tls is not None and bool(self.users)

    def authorized(self, environ):
        """Whether the request's basic auth matches a user's bcrypt hash.
        An unknown user costs one bcrypt check too, so that timing does
        not tell which users exist."""
        import bcrypt
        scheme, _, value = environ.get("HTTP_AUTHORIZATION", "").partition(
            " ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(
                value.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            if self.dummy is None:
                self.dummy = bcrypt.hashpw(b"", bcrypt.gensalt(4))
            bcrypt.checkpw(password.encode(), self.dummy)
            return False
        token = hmac.new(self.secret, b"\0".join(
            (user.encode(), password.encode(), hashed.encode())),
            "sha256").digest()
        if token in self.remembered:
            return True
        if not sep or not bcrypt.checkpw(password.encode(), hashed.encode()):
            return False
        if len(self.remembered) >= self.MAX_REMEMBERED:
            self.remembered.clear()
        self.remembered.add(token)
        return True


def web_mapping(value, where, fail):
    if not isinstance(value, dict) or not all(isinstance(k, str)
                                              for k in value):
        raise fail("%s must be a mapping of names" % where)
    return value


def web_string(section, key, fail, directory=None):
    """A string setting ("" if absent); a file name is taken relative to
    the configuration file's directory, as the toolkit does."""
    value = section.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise fail("tls_server_config.%s must be a string" % key)
    if directory and value:
        return os.path.join(directory, value)
    return value


def tls_problem(e):
    """OpenSSL's reason (KEY_VALUES_MISMATCH: 'key values mismatch'), or
    the system's for a file that cannot be read."""
    reason = getattr(e, "reason", None)
    if reason:
        return reason.lower().replace("_", " ")
    return e.strerror or str(e)


def tls_context(tls, directory, fail):
    """ssl.SSLContext for tls_server_config, or None: no cert_file and no
    key_file mean plain HTTP, as with the toolkit."""
    import ssl
    cert = web_string(tls, "cert_file", fail, directory)
    key = web_string(tls, "key_file", fail, directory)
    client_ca = web_string(tls, "client_ca_file", fail, directory)
    auth = web_string(tls, "client_auth_type", fail)
    if not cert and not key:
        return None
    if not cert or not key:
        raise fail("tls_server_config: missing %s"
                   % ("cert_file" if not cert else "key_file"))
    if auth == "RequireAnyClientCert":
        raise fail("client_auth_type RequireAnyClientCert (any certificate,"
                   " unverified) is not possible with Python's ssl: use "
                   "RequireAndVerifyClientCert with client_ca_file")
    if auth not in CLIENT_AUTH:
        raise fail("invalid client_auth_type %r" % auth)
    if client_ca and CLIENT_AUTH[auth] == "CERT_NONE":
        raise fail("client_ca_file is set but client_auth_type does not "
                   "verify client certificates")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    versions = [web_string(tls, k, fail) or default for k, default in
                (("min_version", "TLS12"), ("max_version", "TLS13"))]
    for version in versions:
        if version not in TLS_VERSIONS:
            raise fail("unknown TLS version %r (TLS10 to TLS13)" % version)
    low, high = (getattr(ssl.TLSVersion, TLS_VERSIONS[v]) for v in versions)
    if low > high:
        raise fail("min_version %s is above max_version %s" % tuple(versions))
    context.minimum_version, context.maximum_version = low, high
    if tls.get("prefer_server_cipher_suites", True) is not False:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise fail("cannot load cert_file %s and key_file %s: %s"
                   % (cert, key, tls_problem(e)))
    context.verify_mode = getattr(ssl, CLIENT_AUTH[auth])
    try:
        if client_ca:
            context.load_verify_locations(client_ca)
        elif context.verify_mode != ssl.CERT_NONE:
            context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    except (OSError, ssl.SSLError) as e:
        raise fail("cannot load client_ca_file %s: %s"
                   % (client_ca, tls_problem(e)))
    return context


def basic_auth_users(users, fail):
    for user, hashed in users.items():
        if not isinstance(hashed, str) or not BCRYPT_HASH.fullmatch(hashed):
            raise fail("basic_auth_users: the password of %r is not a "
                       "bcrypt hash" % user)
    if users:
        try:
            __import__("bcrypt")
        except Exception:
            raise fail("basic_auth_users needs the Python module bcrypt "
                       "(install python3-bcrypt)")
    return dict(users)


def response_headers(http, fail):
    headers = web_mapping(http.get("headers") or {}, "headers", fail)
    for name, value in headers.items():
        if name not in WEB_HEADERS or not isinstance(value, str):
            raise fail("http_server_config.headers: %r is not one of %s"
                       % (name, ", ".join(WEB_HEADERS)))
    return headers.items()


def load_web_config(path):
    """Parse and check --web.config.file; every problem is one Error."""
    def fail(what):
        return Error("--web.config.file %s: %s" % (path, what))

    try:
        import yaml
    except Exception:
        raise fail("needs the Python module yaml (install python3-yaml)")
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise fail(e.strerror or str(e))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        raise fail("not YAML%s: %s" % (
            " (line %d, column %d)" % (mark.line + 1, mark.column + 1)
            if mark else "", getattr(e, "problem", None) or e))
    config = {} if config is None else config
    sections = {}
    for key, value in web_mapping(config, "the file", fail).items():
        if key not in WEB_CONFIG_KEYS:
            raise fail("unknown key %r" % key)
        known = WEB_CONFIG_KEYS[key]
        sections[key] = web_mapping(value, key, fail) if value is not None \
            else {}
        for sub, v in sections[key].items():
            if known is not None and sub not in known:
                raise fail("unknown key %s.%s" % (key, sub))
            if sub in WEB_UNSUPPORTED and v not in (None, "", []) and \
                    known is not None:
                raise fail("%s.%s is not supported: %s"
                           % (key, sub, WEB_UNSUPPORTED[sub]))
    directory = os.path.dirname(os.path.abspath(path))
    return WebConfig(
        tls_context(sections.get("tls_server_config", {}), directory, fail),
        basic_auth_users(sections.get("basic_auth_users", {}), fail),
        response_headers(sections.get("http_server_config", {}), fail))


def guarded(app, web, max_requests):
    """The WSGI app behind the request limit and basic auth: beyond
    max_requests at once a 503 (no scrape's memory or bcrypt check more),
    without the right password a 401."""
    slots = threading.BoundedSemaphore(max_requests) if max_requests \
        else None
    extra = web.headers if web else []

    def answer(start_response, status, text, more=()):
        start_response(status, [("Content-Type", "text/plain; "
                                 "charset=utf-8")] + list(more) + extra)
        return [text.encode()]

    def with_headers(start_response):
        return lambda status, headers, *exc: start_response(
            status, headers + extra, *exc)

    def serve(environ, start_response):
        if slots is not None and not slots.acquire(blocking=False):
            return answer(start_response, "503 Service Unavailable",
                          "More than %d requests at once; try again later.\n"
                          % max_requests)
        try:
            if web and web.users and not web.authorized(environ):
                return answer(start_response, "401 Unauthorized",
                              "Unauthorized\n",
                              [("WWW-Authenticate", "Basic")])
            return list(app(environ, with_headers(start_response)))
        finally:
            if slots is not None:
                slots.release()
    return serve


class MetricsServer:
    """The HTTP(S) side.  Bound before the BPF program loads, so that a port
    in use or a bad address is told at once; served by one thread per
    connection, each with a timeout (TLS handshake included), so that a
    client that hangs holds only its own thread.  Counting is in the kernel
    and never waits for it."""

    CLIENT_TIMEOUT = 10     # seconds a client may take per read or write

    def __init__(self, address, registry, web=None,
                 max_requests=DEFAULT_MAX_REQUESTS):
        from wsgiref.simple_server import WSGIRequestHandler, make_server
        tls = web.tls if web else None

        class Handler(WSGIRequestHandler):
            timeout = self.CLIENT_TIMEOUT

            def setup(self):
                super().setup()         # the timeout first
                if tls is not None:
                    self.connection.do_handshake()

            def log_message(self, *args):
                pass            # no line per scrape in the journal

        class Server(prometheus_client.exposition.ThreadingWSGIServer):
            # Many scrapers at once wait in the kernel's queue, not refused.
            request_queue_size = socket.SOMAXCONN

            def get_request(self):
                conn, client = self.socket.accept()
                if tls is not None:
                    # Handshake in the connection's thread, under its
                    # timeout: plain HTTP or a silent client fails there.
                    conn = tls.wrap_socket(conn, server_side=True,
                                           do_handshake_on_connect=False)
                return conn, client

            def handle_error(self, request, client):
                pass    # a client's timeout, reset or failed handshake

        host, port = self.address = address
        self.registry, self.tls = registry, tls
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM)[0]
            Server.address_family = family
            self.httpd = make_server(
                sockaddr[0], port, guarded(
                    metrics_app(registry), web,
                    max_requests), Server, handler_class=Handler)
        except OSError as e:    # socket.gaierror is one
            raise Error("cannot listen on %s: %s"
                        % (self.where(), e.strerror or e))
        self.thread = None

    def where(self):
        host, port = self.address
        return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)

    def url(self):
        return "%s://%s/metrics" % ("https" if self.tls else "http",
                                    self.where())

    def start(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       name="metrics", daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()


def build_info(probe, layout, max_threads=None, latency=False,
               detail=False):
    """kvmexit_build_info's labels: the version and what shapes the data."""
    return {"version": VERSION, "probe": probe.kind,
            "slots": str(layout.slots),
            "bcc": str(getattr(bcc, "__version__", "unknown")),
            "max_threads": str(max_threads or ""),
            "latency": "true" if latency else "false",
            "detail": "true" if detail else "false"}


WILDCARDS = ("0.0.0.0", "::", "")


def listen(address, web=None, max_requests=DEFAULT_MAX_REQUESTS):
    """The metrics server, bound but not serving yet."""
    client = import_prometheus_client()
    # Collectors without describe() (process_*) are named by a collect()
    # at registration, so that /metrics?name[]=... finds them too.
    registry = client.CollectorRegistry(auto_describe=True)
    client.ProcessCollector(registry=registry)
    client.PlatformCollector(registry=registry)
    server = MetricsServer(address, registry, web, max_requests)
    if address[0] in WILDCARDS and not (web and web.protected):
        emit("kvmexit: warning: listening on every address (%s): anyone "
             "who reaches this host can read its VMs' names and activity; "
             "give one address, or TLS and basic_auth_users with "
             "--web.config.file\n" % server.where(), sys.stderr)
    return server


def sd_notify(state, environ=None):
    """Tell systemd (Type=notify) READY=1 or STOPPING=1 through
    $NOTIFY_SOCKET, a unix datagram socket ('@' starts an abstract name).
    Nothing without it.  Returns whether it was sent."""
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as e:
        emit("kvmexit: warning: cannot tell systemd %s through "
             "NOTIFY_SOCKET: %s\n" % (state, e.strerror or e), sys.stderr)
        return False
    return True


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


# How long one sigtimedwait() waits when the wait has no end.
LONG_WAIT = 3600.0


def wait_for_stop(seconds):
    """Sleep; True if Ctrl-C or SIGTERM came first.  The signals are
    blocked and taken here, so one arriving while a report is being read or
    printed waits for the next wait instead of cutting the report short.
    Only a stop signal ends it: after a SIGSTOP/SIGCONT (Ctrl-Z, a
    debugger) CPython 3.11's sigtimedwait() can return early, even with a
    siginfo of no signal, so the answer is checked and the wait resumed."""
    deadline = None if seconds is None else \
        time.monotonic() + max(0.0, seconds)
    while True:
        left = LONG_WAIT if deadline is None else \
            deadline - time.monotonic()
        if left <= 0:
            return False
        info = signal.sigtimedwait(STOP_SIGNALS, left)
        if info is not None and info.si_signo in STOP_SIGNALS:
            return True


def serve(server, exporter, ledger, tables, keep, debug=False):
    """--prometheus: serve scrapes until SIGTERM or Ctrl-C, retiring the
    threads of ended VMs every TICK seconds and dropping the series of VMs
    gone for `keep` seconds.  systemd hears READY=1 once the server
    answers, STOPPING=1 when it is told to stop."""
    server.registry.register(exporter)
    server.start()
    if debug:
        emit("kvmexit: listening on %s\n" % server.url(), sys.stderr)
    sd_notify("READY=1")
    try:
        while not wait_for_stop(TICK):
            ledger.retire(tables)
            tables.grow()
            exporter.vm_names.note(ledger.tgids)
            exporter.vm_names.forget(ledger.forget_gone(keep))
        sd_notify("STOPPING=1")
    finally:
        server.stop()


#
# Main
#
def first_line(selection, args):
    line = "Display kvm exit reasons and statistics for %s" % \
        selection.context
    if args.comm and selection.processes(tgid_of):
        line += " (%s)" % ", ".join(process_name(p) for p in
                                    selection.processes(tgid_of))
    if args.interval:
        line += " every %d secs" % args.interval
        return line + (", %d times." % args.count if args.count else
                       "... Hit Ctrl-C to end.")
    if args.duration:
        return line + " after sleeping %d secs." % args.duration
    return line + "... Hit Ctrl-C to end."


def wait_ticking(until, tick=None):
    """wait_for_stop() until the time `until` (None: until a signal),
    calling tick() every TICK seconds meanwhile."""
    while True:
        left = None if until is None else until - time.time()
        if tick is None or (left is not None and left <= TICK):
            return wait_for_stop(left)
        if wait_for_stop(TICK):
            return True
        tick()


def takes_retired(args):
    """Whether each report shows the counts of threads retired since the
    last one only once: reports of intervals."""
    return bool(args.interval) and not args.cumulative


def trace(read, report, args, tick=None):
    """Report after the duration, or every interval; Ctrl-C or SIGTERM
    reports what was counted so far and ends.  tick(): every TICK seconds
    meanwhile."""
    period = args.interval or args.duration
    begin = last = time.time()
    earlier = None
    done = 0
    while True:
        interrupted = wait_ticking(last + period if period else None, tick)
        now = time.time()
        if interrupted and not (args.json or args.csv or args.interval):
            emit("\n")         # after the ^C, as bcc does
        snap = read()
        shown = snap if earlier is None or args.cumulative else \
            snap.minus(earlier)
        report(shown, begin if args.cumulative else last, now)
        warn_lost(shown)
        if takes_retired(args):
            snap = without_retired(snap)
        earlier, last, done = snap, now, done + 1
        if interrupted or not args.interval or done == args.count:
            return


def announce(line):
    """--prometheus's first line: stdout is no report there, so a closed or
    full one does not stop the service."""
    try:
        emit(line)
    except OutputError:
        pass


def main(argv=None, stdout_closed=False):
    args = parse_args(argv)
    if stdout_closed and not args.prometheus:
        raise Error("standard output is closed: nothing to report to")
    web = load_web_config(args.web_config) if args.web_config else None
    check_privileges()
    check_bcc()
    tp_dir = tracepoint_dir()
    if tp_dir is None:
        if not os.path.exists("/dev/kvm"):
            raise Error("KVM is not loaded: no /dev/kvm and no kvm:kvm_exit "
                        "tracepoint (modprobe kvm_intel or kvm_amd)")
        raise Error("no kvm:kvm_exit tracepoint under %s (is tracefs "
                    "mounted?)" % " or ".join(TRACEFS_DIRS))
    kvm = check_exit_fields(tp_dir)
    selection = select_readable(args)
    vmms = vmm_processes()
    max_threads = args.max_threads or max(MIN_MAX_THREADS,
                                          2 * sum(vmms.values()))
    check_kernel_headers()
    probe = choose_probe(args.probe, tp_dir, detail=args.detail, kvm=kvm)
    check_vcpu_ids(selection, probe)
    layout = ARM64.layout if kvm == "arm64" else slot_layout()
    ncpus = possible_cpus()
    program = Program(probe, selection, max_threads, layout,
                      frozenset(feature.name for feature in FEATURES
                                if getattr(args, feature.name, False)) |
                      {"growth"} |
                      ({"names"} if task_offsets() else frozenset()))
    check_table_memory(program, ncpus)
    names = kernel_reason_names(tp_dir)
    if args.prometheus:
        # A port in use: told before loading.
        server = listen(args.prometheus, web, args.web_max_requests)

    b, program = start_tracing(program, args.debug)
    BTF_CACHE.clear()       # 9 MB of BTF, needed only until now
    probe = program.probe
    if args.debug:
        print("kvmexit: probe: %s (%s)" % (probe.kind, probe.why),
              file=sys.stderr)
    tables = ThreadTables(b, program, ncpus)
    ledger = Ledger()

    # Blocked before any thread starts: only the main thread takes them.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    if args.prometheus:
        announce(first_line(selection, args) + "\n")
        exporter = Exporter(lambda: ledger.read(tables), names, selection,
                            VmNames(idents=ledger.idents), args.latency,
                            build_info(probe, layout, max_threads,
                                       args.latency, args.detail),
                            BpfSelf(b, tables), args.labels,
                            args.latency_labels,
                            args.detail)
        serve(server, exporter, ledger, tables,
              args.keep_gone or DEFAULT_KEEP_GONE, args.debug)
        return 0
    machine = args.json or args.csv
    emit(first_line(selection, args) + "\n",
         sys.stderr if machine else sys.stdout)
    if machine:
        output = RecordReport(selection, names, probe,
                              ReportOptions.of(args))
    else:
        output = TextReport(selection, names, ReportOptions.of(args))
    output.idents = ledger.idents
    if args.comm or machine:
        # Named now: a VM that ends before the report keeps its name.
        output.comms.update((pid, process_name(pid)) for pid in vmms)

    def tick():
        ledger.retire(tables)
        tables.grow()
        for tgid in ledger.tgids - set(output.comms):
            output.comm(tgid)

    trace(lambda: ledger.read(tables, takes_retired(args)), output.report,
          args, tick)
    return 0


class ForgivingStream:
    """sys.stderr that never raises: a warning or debug line lost to a full
    or broken stderr must not cost the report on stdout."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError:
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError:
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Stopped(BaseException):
    """SIGTERM before tracing began (afterwards it is blocked and waited
    for): ends the run quietly."""


def stop_requested(signum, frame):
    raise Stopped()


def open_std_streams():
    """Give a closed stdin, stdout or stderr /dev/null, so that no file the
    tool opens (a BPF map, a temporary file) takes its number and receives
    what bcc or clang write there.  Returns whether stdout was closed."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name, fd in (("stdout", 1), ("stderr", 2)):
        if fd in closed or getattr(sys, name) is None:
            setattr(sys, name, open(fd, "w", closefd=False))
        # Names from /proc are any bytes: never fail to print one.
        getattr(sys, name).reconfigure(errors="backslashreplace")
    sys.stderr = ForgivingStream(sys.stderr)
    return 1 in closed


def run():
    """The command: main() with errors as one 'kvmexit:' line."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop_requested)
    try:
        status = main(stdout_closed=open_std_streams())
    except OutputError as e:
        # A closed pipe (kvmexit | head -1) or a full disk: what was
        # counted could not be shown, so say so.
        status, message = 1, "kvmexit: %s" % e
    except Error as e:
        status, message = 1, "kvmexit: %s" % e
    except KeyboardInterrupt:
        status, message = 130, None
    except Stopped:
        status, message = 0, None
    except OSError as e:
        # Not foreseen, but still one line: e.g. -h > /dev/full.
        status = 1
        message = "kvmexit: %s%s" % (e.strerror or e, ": %s" % e.filename
                                     if e.filename else "")
    else:
        message = None
    if message:
        try:
            print(message, file=sys.stderr, flush=True)
        except OSError:
            pass            # stderr is gone too; the status still tells
    if status:
        # Python flushes stdout once more at exit: where that failed before
        # it would fail again, with a message of its own.
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.close(null)
        except OSError:
            pass            # no /dev/null (e.g. /dev hidden): nothing left
    sys.exit(status)


if __name__ == "__main__":
    run()
