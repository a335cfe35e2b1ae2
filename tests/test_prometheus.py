"""--prometheus: /metrics written by prometheus_client from the real maps.

The exporter's collector reads kvmexit's program (raw-old mode, SVM
layout), filled through BPF_PROG_TEST_RUN by real processes: children
started with QEMU's `-name guest=NAME` on their command line (or another
process name), handed the program's fd, each test run one kvm_exit of
theirs (tests/helpers/bpfrun.py).  Scrapes are parsed with prometheus_client's own
parser.  The HTTP side is a real server on loopback, and the command is
run as the service would run it.  A real Prometheus server scrapes it in
the lab (tests/lab/test_lab_fleet.py).

Runs as root on the real kernel, never skipped (see conftest.py)."""

import argparse
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from helpers import bpfrun
import kvmexit
from helpers import SCRIPT, SYSTEM_PYTHON, TESTS

SVM = kvmexit.ISA_SVM
IOIO, HLT, INTR = 0x7b, 0x78, 0x60

# A VM stand-in: runs exits on command from stdin ("CPU CODE TIMES" or
# "thread CPU CODE TIMES" for a new thread that then ends), answers "ok".
VM = r"""
import ctypes, os, sys, threading
sys.path.insert(0, sys.argv[1])
from helpers import bpfrun
fd = int(sys.argv[2])
if len(sys.argv) > 3 and sys.argv[3] == "comm":
    ctypes.CDLL(None).prctl(15, sys.argv[4].encode(), 0, 0, 0)
def fire(cpu, code, times):
    os.sched_setaffinity(0, {cpu})
    for _ in range(times):
        bpfrun.test_run(fd, [code, 0, 2])
for line in sys.stdin:
    words = line.split()
    if words[0] == "thread":
        t = threading.Thread(target=fire, args=tuple(map(int, words[1:])))
        t.start()
        t.join()
        print("ok", t.native_id, flush=True)
    else:
        fire(*map(int, words))
        print("ok", flush=True)
"""


class Vm:
    """A child process whose exits the program counts; named by QEMU's
    -name (guest=...) or by its comm."""

    def __init__(self, fd, guest=None, comm=None):
        argv = [SYSTEM_PYTHON, "-c", VM, TESTS, str(fd)]
        if comm:
            argv += ["comm", comm]
        if guest:
            argv += ["-name", "guest=%s,debug-threads=on" % guest]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     pass_fds=[fd])
        self.pid = self.proc.pid

    def exits(self, cpu, code, times=1):
        self.proc.stdin.write("%d %d %d\n" % (cpu, code, times))
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "ok\n"

    def thread_exits(self, cpu, code, times=1):
        """In a new thread of the VM, which then ends; its tid."""
        self.proc.stdin.write("thread %d %d %d\n" % (cpu, code, times))
        self.proc.stdin.flush()
        word, tid = self.proc.stdout.readline().split()
        assert word == "ok"
        return int(tid)

    def end(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0
        self.proc.stdout.close()


@pytest.fixture
def vms():
    made = []

    def make(*args, **kw):
        made.append(Vm(*args, **kw))
        return made[-1]

    yield make
    for vm in made:
        if vm.proc.poll() is None:
            vm.proc.kill()
            vm.proc.wait()


class Exported:
    """A loaded program, its ledger and the collector over them."""

    def __init__(self, bcc, latency=False, selection=None, max_threads=64,
                 labels=kvmexit.SERIES_LABELS, latency_labels=None):
        selection = selection or kvmexit.Selection("all threads", "all")
        program = kvmexit.Program(kvmexit.Probe("raw-old", "test"),
                                  selection, max_threads, kvmexit.SVM_LAYOUT,
                                  {"latency"} if latency else ())
        self.b = kvmexit.load_program(program)
        self.fd = self.b.load_func(b"raw_kvm_exit",
                                   bcc.BPF.RAW_TRACEPOINT).fd
        self.tables = kvmexit.ThreadTables(self.b, program,
                                           kvmexit.possible_cpus())
        self.ledger = kvmexit.Ledger()
        self.exporter = kvmexit.Exporter(
            lambda: self.ledger.read(self.tables), kvmexit.ReasonNames(),
            selection, kvmexit.VmNames(), latency,
            {"version": kvmexit.VERSION, "probe": "raw-old"},
            kvmexit.BpfSelf(self.b), labels, latency_labels)
        self.registry = CollectorRegistry()
        self.registry.register(self.exporter)

    def scrape(self):
        """{metric sample name: {labels as a sorted tuple: value}}."""
        return parse(generate_latest(self.registry).decode())

    def tick(self, keep=kvmexit.DEFAULT_KEEP_GONE):
        """What serve() does every second."""
        self.ledger.retire(self.tables)
        self.exporter.vm_names.note(self.ledger.tgids)
        self.exporter.vm_names.forget(self.ledger.forget_gone(keep))

    def close(self):
        self.b.cleanup()


def parse(text):
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(
                s.labels.items()))] = s.value
    return samples


def series(vm, pid, reason, vcpu="unknown"):
    return tuple(sorted({"vm": vm, "pid": str(pid), "vcpu": vcpu,
                         "isa": "svm", "reason": reason}.items()))


@pytest.fixture
def exported(bcc, cpus_0_1):
    made = []

    def make(**kw):
        made.append(Exported(bcc, **kw))
        return made[-1]

    yield make
    for e in made:
        e.close()


#
# What a scrape says
#
def test_exits_per_vm_vcpu_and_reason_named_by_qemu_guest_or_process(
        exported, vms):
    e = exported()
    a = vms(e.fd, guest="web-1")
    b = vms(e.fd, comm="firecracker")
    a.exits(0, IOIO, 5)
    a.exits(1, HLT)
    b.exits(1, IOIO, 2)
    b.exits(0, INTR, 3)
    got = e.scrape()
    assert got["kvm_exits_total"] == {
        series("web-1", a.pid, "IOIO"): 5, series("web-1", a.pid, "HLT"): 1,
        series("firecracker", b.pid, "IOIO"): 2,
        series("firecracker", b.pid, "INTR"): 3}
    assert got["kvmexit_lost_exits_total"] == {
        (("why", why),): 0 for why in ("thread_table_full",
                                       "rare_table_full",
                                       "reason_unreadable",
                                       "latency_table_full",
                                       "write_back_failed")}
    assert got["kvmexit_build_info"] == {
        (("probe", "raw-old"), ("version", kvmexit.VERSION)): 1}


def test_a_name_filter_serves_only_that_metric(served, vms):
    e, port = served
    vm = vms(e.fd, guest="only")
    vm.exits(0, IOIO, 4)
    status, text = get(port, "/metrics?name[]=kvm_exits_total")
    assert status == 200
    assert parse(text) == {"kvm_exits_total": {
        series("only", vm.pid, "IOIO"): 4}}
    status, text = get(port, "/metrics?name[]=kvmexit_lost_exits_total"
                             "&name[]=process_open_fds")
    assert sorted(parse(text)) == ["kvmexit_lost_exits_total",
                                   "process_open_fds"]


BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 32, 0


def test_self_metrics_table_fill_and_bpf_run_time(exported, vms):
    e = exported()
    # Accounting on for as long as the fd is held, as the sysctl would,
    # without changing the sysctl under other users of this kernel.
    stats_fd, _ = bpfrun.bpf(BPF_ENABLE_STATS,
                             struct.pack("<I", BPF_STATS_RUN_TIME))
    try:
        a, b = vms(e.fd, guest="a"), vms(e.fd, guest="b")
        a.exits(0, IOIO, 5)
        b.thread_exits(1, HLT, 2)
        b.exits(1, INTR, 3)
    finally:
        os.close(stats_fd)
    got = e.scrape()
    entries = {dict(k)["table"]: v
               for k, v in got["kvmexit_table_entries"].items()}
    capacity = {dict(k)["table"]: v
                for k, v in got["kvmexit_table_capacity"].items()}
    # bcc's own walk of each table agrees; the thread table has room for
    # --max-threads, the rare one for MAX_RARE.
    assert entries == {name: len(list(e.b[name.encode()].keys()))
                       for name in entries}
    assert sorted(entries) == sorted(capacity)
    assert sum(entries.values()) > 0
    assert capacity["pcpu_kvm_stat"] == 64
    assert capacity["pcpu_rare_stat"] == kvmexit.MAX_RARE
    assert got["kvmexit_bpf_runs_total"] == {
        (("program", "raw_kvm_exit"),): 10}
    (run_seconds,) = got["kvmexit_bpf_run_seconds_total"].values()
    assert 0 < run_seconds < 0.01
    assert got["kvmexit_collect_errors_total"] == {(): 0}
    (took,) = got["kvmexit_collect_duration_seconds"].values()
    assert 0 < took < 5


def test_a_failed_read_is_counted_and_the_rest_still_served(exported):
    e = exported()

    def broken():
        raise OSError(5, "Input/output error")

    e.exporter.read = broken
    got = parse(generate_latest(e.registry).decode())
    assert "kvm_exits_total" not in got
    assert got["kvmexit_collect_errors_total"] == {(): 1}
    assert "kvmexit_build_info" in got


def test_a_live_vms_counters_never_go_down_as_its_threads_are_retired(
        exported, vms):
    e = exported()
    vm = vms(e.fd, guest="db")
    vm.exits(0, IOIO, 4)
    ended = vm.thread_exits(1, IOIO, 3)        # a thread that ends
    first = e.scrape()["kvm_exits_total"]
    assert first == {series("db", vm.pid, "IOIO"): 7}
    vm.exits(1, IOIO, 1)                       # evicts the ended thread
    vm.exits(0, IOIO, 1)
    e.tick()
    assert (vm.pid, ended, SVM, IOIO) in e.ledger.retired["counts"]
    assert e.scrape()["kvm_exits_total"] == {
        series("db", vm.pid, "IOIO"): 9}
    # Long after: the process lives, so nothing of it is dropped.
    e.ledger.clock = lambda: time.monotonic() + 10 ** 6
    e.tick(keep=1)
    assert e.scrape()["kvm_exits_total"] == {
        series("db", vm.pid, "IOIO"): 9}


def test_a_gone_vm_is_served_with_its_name_for_keep_gone_then_dropped(
        exported, vms):
    e = exported()
    gone, stays = vms(e.fd, guest="old"), vms(e.fd, guest="new")
    gone.exits(0, IOIO, 6)
    gone.exits(1, HLT)
    e.tick()                                   # names noted while alive
    gone.end()
    stays.exits(0, INTR, 2)                    # evicts `gone` from CPU 0
    stays.exits(1, INTR, 1)                    # and from CPU 1
    now = [1000.0]
    e.ledger.clock = lambda: now[0]
    e.tick(keep=30)
    assert gone.pid in {k[0] for k in e.ledger.retired["counts"]}
    expected = {series("old", gone.pid, "IOIO"): 6,
                series("old", gone.pid, "HLT"): 1,
                series("new", stays.pid, "INTR"): 3}
    assert e.scrape()["kvm_exits_total"] == expected
    now[0] += 29
    e.tick(keep=30)
    assert e.scrape()["kvm_exits_total"] == expected
    now[0] += 1
    e.tick(keep=30)
    assert e.scrape()["kvm_exits_total"] == {
        series("new", stays.pid, "INTR"): 3}
    assert e.ledger.size() == 0
    assert gone.pid not in e.exporter.vm_names.names


def test_latency_is_a_histogram_with_power_of_two_edges(exported, vms):
    # kvm_entry, which fills the latency table, is a regular tracepoint
    # and cannot be test-run: the entry is written as it writes it.
    e = exported(latency=True)
    vm = vms(e.fd, guest="lat")
    vm.exits(0, IOIO, 4)
    hist = [0] * kvmexit.LAT_BUCKETS
    for ns in (300, 300, 3000, 600_000_000):    # <512 ns, <4 us, <1.07 s
        hist[kvmexit.latency_bucket(ns)] += 1
    words = [4, 2 * 300 + 3000 + 600_000_000, 600_000_000] + hist
    table = e.b[b"exit_latency"]
    key = (vm.pid << 32 | vm.pid).to_bytes(8, "little") + \
        SVM.to_bytes(4, "little") + IOIO.to_bytes(4, "little")
    table[table.Key.from_buffer_copy(key)] = table.Leaf.from_buffer_copy(
        b"".join(w.to_bytes(8, "little") for w in words))
    got = e.scrape()
    labels = dict(series("lat", vm.pid, "IOIO"))
    buckets = {dict(k)["le"]: v for k, v in
               got["kvm_exit_handling_seconds_bucket"].items()
               if {n: v for n, v in k if n != "le"} == labels}
    # Edges at 2^8, 2^10 ... 2^34 ns: the counts below each.
    assert buckets["2.56e-07"] == 0
    assert buckets["1.024e-06"] == 2
    assert buckets["4.096e-06"] == 3
    assert buckets["0.268435456"] == 3
    assert buckets["1.073741824"] == 4
    assert buckets["+Inf"] == 4
    assert len(buckets) == len(kvmexit.LATENCY_EDGES) + 1
    assert got["kvm_exit_handling_seconds_count"] == {
        tuple(sorted(labels.items())): 4}
    assert got["kvm_exit_handling_seconds_sum"][
        tuple(sorted(labels.items()))] == pytest.approx(0.6000036)


def latency_entry(e, pid, code, times_ns):
    """Write a thread's latency entry as kvm_entry writes it (it cannot be
    test-run)."""
    hist = [0] * kvmexit.LAT_BUCKETS
    for ns in times_ns:
        hist[kvmexit.latency_bucket(ns)] += 1
    words = [len(times_ns), sum(times_ns), max(times_ns)] + hist
    table = e.b[b"exit_latency"]
    key = (pid << 32 | pid).to_bytes(8, "little") + \
        SVM.to_bytes(4, "little") + code.to_bytes(4, "little")
    table[table.Key.from_buffer_copy(key)] = table.Leaf.from_buffer_copy(
        b"".join(w.to_bytes(8, "little") for w in words))


def test_labels_left_out_are_summed_over_so_no_series_collide(exported,
                                                               vms):
    # Two VMs of one name (a name reused on one host): apart by pid, one
    # series without it.
    e = exported(labels=("vm", "reason"))
    a, b = vms(e.fd, guest="web"), vms(e.fd, guest="web")
    c = vms(e.fd, guest="db")
    a.exits(0, IOIO, 5)
    b.exits(1, IOIO, 2)
    b.exits(1, HLT, 1)
    c.exits(0, IOIO, 7)
    got = e.scrape()["kvm_exits_total"]
    assert got == {(("reason", "IOIO"), ("vm", "web")): 7,
                   (("reason", "HLT"), ("vm", "web")): 1,
                   (("reason", "IOIO"), ("vm", "db")): 7}
    only = exported(labels=("reason",))
    a2, c2 = vms(only.fd, guest="web"), vms(only.fd, guest="db")
    a2.exits(0, IOIO, 3)
    c2.exits(1, IOIO, 4)
    assert only.scrape()["kvm_exits_total"] == {(("reason", "IOIO"),): 7}


def test_latency_labels_sum_histograms_over_what_they_leave_out(exported,
                                                                  vms):
    e = exported(latency=True, latency_labels=("isa", "reason"))
    a, b = vms(e.fd, guest="a"), vms(e.fd, guest="b")
    a.exits(0, IOIO, 2)
    b.exits(1, IOIO, 1)
    latency_entry(e, a.pid, IOIO, [300, 3000])
    latency_entry(e, b.pid, IOIO, [600_000_000])
    got = e.scrape()
    reason = (("isa", "svm"), ("reason", "IOIO"))
    assert got["kvm_exit_handling_seconds_count"] == {reason: 3}
    buckets = {dict(k)["le"]: v for k, v in
               got["kvm_exit_handling_seconds_bucket"].items()}
    assert buckets["1.024e-06"] == 1
    assert buckets["4.096e-06"] == 2
    assert buckets["+Inf"] == 3
    # The counter keeps its own labels.
    assert got["kvm_exits_total"] == {series("a", a.pid, "IOIO"): 2,
                                      series("b", b.pid, "IOIO"): 1}


def test_label_lists_are_in_a_fixed_order_and_keep_the_reason():
    assert kvmexit.label_list("vcpu,vm") == ("vm", "vcpu", "reason")
    assert kvmexit.label_list("reason") == ("reason",)
    assert kvmexit.label_list("") == ("reason",)
    args = kvmexit.parse_args(["--prometheus", "9417", "--latency"])
    assert args.labels == ("vm", "pid", "vcpu", "isa", "reason")
    assert args.latency_labels == ("isa", "reason")


#
# The HTTP side
#
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path="/metrics", timeout=5):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path),
                                timeout=timeout) as r:
        return r.status, r.read().decode()


@pytest.fixture
def served(exported):
    e = exported()
    port = free_port()
    server = kvmexit.listen(("127.0.0.1", port))
    server.registry.register(e.exporter)
    server.start()
    yield e, port
    server.stop()


def test_a_port_in_use_is_one_error(exported):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(kvmexit.Error) as exc:
            kvmexit.listen(("127.0.0.1", port))
    assert str(exc.value) == "cannot listen on 127.0.0.1:%d: Address " \
        "already in use" % port


@pytest.mark.parametrize("host", ["192.0.2.1", "999.1.1.1"])
def test_an_address_it_cannot_listen_on_is_one_error(host):
    with pytest.raises(kvmexit.Error) as exc:
        kvmexit.listen((host, 9417))
    assert str(exc.value).startswith("cannot listen on %s:9417: " % host)


def test_localhost_is_resolved(exported):
    e = exported()
    port = free_port()
    server = kvmexit.listen(("localhost", port))
    server.registry.register(e.exporter)
    server.start()
    try:
        status, text = get(port)
    finally:
        server.stop()
    assert status == 200
    assert server.httpd.server_address == ("127.0.0.1", port)
    assert 'kvmexit_lost_exits_total{why="thread_table_full"} 0.0' in text


def test_a_garbage_request_fails_alone(served, vms):
    e, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x02\x00garbage \xff\xfe\r\n\r\n")
        answer = s.recv(4096)
    # Not even HTTP: answered as HTTP/0.9, a body without a status line.
    assert b"Error code: 400" in answer
    vm = vms(e.fd, guest="after")
    vm.exits(0, IOIO, 2)
    status, text = get(port)
    assert status == 200
    assert 'kvm_exits_total{isa="svm",pid="%d",reason="IOIO",vcpu=' \
        '"unknown",vm="after"} 2.0' % vm.pid in text


def test_a_client_that_hangs_holds_up_neither_scrapes_nor_counting(
        served, vms):
    e, port = served
    hanging = [socket.create_connection(("127.0.0.1", port))
               for _ in range(3)]
    # One sends half a request, one asks and never reads the answer.
    hanging[1].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    hanging[2].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    hanging[2].sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    try:
        vm = vms(e.fd, guest="busy")
        vm.exits(1, HLT, 3)
        started = time.monotonic()
        e.ledger.retire(e.tables)
        status, text = get(port, timeout=5)
        assert time.monotonic() - started < 5
        assert status == 200
        assert 'reason="HLT",vcpu="unknown",vm="busy"} 3.0' in text
    finally:
        for s in hanging:
            s.close()


#
# The command
#
def start(args):
    return subprocess.Popen([SYSTEM_PYTHON, SCRIPT] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_line(stream, prefix, timeout=120):
    """The first line of `stream` starting with prefix (read in a thread,
    so that a tool that prints nothing fails the test, not hangs it)."""
    found = []

    def read():
        for line in stream:
            if line.startswith(prefix):
                found.append(line.rstrip("\n"))
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    assert found, "no line starting with %r" % prefix
    return found[0]


def test_the_command_serves_metrics_and_ends_cleanly_on_sigterm(bcc):
    port = free_port()
    tool = start(["--prometheus", "127.0.0.1:%d" % port, "-d",
                  "-p", os.getpid()])
    try:
        assert wait_for_line(tool.stderr, "kvmexit: listening") == \
            "kvmexit: listening on http://127.0.0.1:%d/metrics" % port
        status, text = get(port)
        assert status == 200
        metrics = parse(text)
        assert metrics["kvmexit_lost_exits_total"][
            (("why", "thread_table_full"),)] == 0
        assert "process_resident_memory_bytes" in metrics
        (build,) = metrics["kvmexit_build_info"]
        assert dict(build)["version"] == kvmexit.VERSION
        tool.send_signal(signal.SIGTERM)
        out, err = tool.communicate(timeout=30)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert tool.returncode == 0
    assert out == "Display kvm exit reasons and statistics for PID %d... " \
        "Hit Ctrl-C to end.\n" % os.getpid()
    assert "Traceback" not in err
    # Nothing listens there any more (as the tool's server does, allow
    # the closed connections' TIME_WAIT).
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_the_command_tells_a_port_in_use_in_one_line(bcc):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        tool = start(["--prometheus", str(port)])
        out, err = tool.communicate(timeout=120)
    assert (tool.returncode, out) == (1, "")
    assert err.splitlines() == ["kvmexit: cannot listen on 127.0.0.1:%d: "
                                "Address already in use" % port]


@pytest.mark.parametrize("args, message", [
    (["--prometheus", "70000"], "argument --prometheus: must be "
     "[ADDR:]PORT, PORT from 1 to 65535: '70000'"),
    (["--prometheus", "host:"], "argument --prometheus: must be "
     "[ADDR:]PORT, PORT from 1 to 65535: 'host:'"),
    (["--prometheus", "9417", "-i", "1"],
     "--prometheus prints no report: drop -i"),
    (["--prometheus", "9417", "--json"],
     "--prometheus prints no report: drop --json"),
    (["--prometheus", "9417", "5"],
     "--prometheus prints no report: drop the duration"),
    (["--keep-gone", "60"], "--keep-gone needs --prometheus"),
    (["--web.config.file", "web.yml"],
     "--web.config.file needs --prometheus"),
    (["--web.max-requests", "3", "1"],
     "--web.max-requests needs --prometheus"),
    (["--labels", "vm", "1"], "--labels needs --prometheus"),
    (["--prometheus", "9417", "--latency-labels", "vm"],
     "--latency-labels needs --latency"),
    (["--prometheus", "9417", "--labels", "vm,tid"],
     "argument --labels: must be comma-separated labels of vm, pid, vcpu, "
     "isa, reason: 'vm,tid'"),
    (["--prometheus", "9417", "--web.max-requests", "-1"],
     "argument --web.max-requests: must be a non-negative integer: '-1'"),
])
def test_prometheus_arguments_that_cannot_work(args, message):
    tool = start(args)
    out, err = tool.communicate(timeout=60)
    assert (tool.returncode, out) == (2, "")
    assert err.splitlines()[-1] == "kvmexit: error: " + message


def test_the_version_is_setup_cfgs():
    with open(os.path.join(os.path.dirname(SCRIPT), "setup.cfg")) as f:
        assert "version = %s\n" % kvmexit.VERSION in f.read()


def test_listen_address_defaults_to_loopback():
    assert kvmexit.listen_address("9417") == ("127.0.0.1", 9417)
    assert kvmexit.listen_address("0.0.0.0:9417") == ("0.0.0.0", 9417)
    assert kvmexit.listen_address("[::1]:9417") == ("::1", 9417)


@pytest.mark.parametrize("text", ["[::1:9417", "::1]:9417", "::1:9417",
                                  "[[::1]]:9417", "a]:9417"])
def test_an_ipv6_listen_address_needs_its_brackets(text):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        kvmexit.listen_address(text)
    assert str(e.value) == "must be [ADDR:]PORT, an IPv6 ADDR in brackets " \
        "([::1]:9417): %r" % text

