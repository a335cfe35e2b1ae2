"""The options beyond bcc's: intervals, JSON/CSV, latency, vCPU and process
columns, top-N.  Pure Python on hand-made snapshots; the lab checks them
on real exits (tests/lab/test_lab_kvmexit.py)."""

import csv
import io
import json

import pytest

import kvmexit

NAMES = kvmexit.ReasonNames()
IOIO, HLT, READ_CR4, NPF = 0x7b, 0x78, 0x04, 0x400


def lat(*times):
    """The Latency the kernel keeps for exits handled in these times."""
    hist = [0] * kvmexit.LAT_BUCKETS
    for t in times:
        hist[kvmexit.latency_bucket(t)] += 1
    return kvmexit.Latency(len(times), sum(times), max(times), hist)


def snap():
    """Two threads of PID 5 (vCPUs 0 and 1) and one of PID 9 (vCPU id
    unknown)."""
    counts = {(5, 6, 2, IOIO): 10, (5, 6, 2, HLT): 1, (5, 6, 2, READ_CR4): 4,
              (5, 7, 2, IOIO): 3, (5, 7, 2, NPF): 3, (9, 10, 2, IOIO): 2}
    latency = {(5, 6, 2, IOIO): lat(*[4000] * 4 + [5000] * 5 + [9000]),
               (5, 6, 2, READ_CR4): lat(100, 200, 200, 300),
               (5, 7, 2, IOIO): lat(400, 600, 2000)}
    return kvmexit.Snapshot(counts, {(5, 6): 0, (5, 7): 1,
                                     (9, 10): kvmexit.VCPU_ID_UNKNOWN},
                            [0, 0, 0, 0], latency)


def text(selection, **opts):
    out = io.StringIO()
    report = kvmexit.TextReport(selection, NAMES,
                                kvmexit.ReportOptions(**opts), out)
    report.comms.update({5: "qemu-system-x86 guest=vm1", 9: "crosvm"})
    traced = snap()
    if selection.tgid:          # as the in-kernel filter would have it
        traced.counts = {k: n for k, n in traced.counts.items()
                         if k[0] == selection.tgid}
    report.report(traced, 0, 0)
    return out.getvalue().splitlines()


ALL = kvmexit.Selection("all threads", "all")
PID5 = kvmexit.Selection("PID 5", "pid", tgid=5)


@pytest.mark.parametrize("argv, error", [
    (["-i", "1", "5"], "use -c COUNT with -i, not a duration"),
    (["-c", "2"], "-c and --cumulative need -i INTERVAL"),
    (["--cumulative"], "-c and --cumulative need -i INTERVAL"),
    (["-i", "0"], "argument -i/--interval: must be a positive integer: '0'"),
    (["--top", "0"], "argument --top: must be a positive integer: '0'"),
    (["--json", "--csv"], "argument --csv: not allowed with argument --json"),
])
def test_option_misuse_is_a_usage_error(argv, error, capsys):
    with pytest.raises(SystemExit) as exit:
        kvmexit.parse_args(argv)
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "kvmexit: error: " + \
        error


def test_latency_columns_in_microseconds_and_dash_when_unmeasured():
    # IOIO of PID 5: 13 exits in 400, 600, 2000, 4 x 4000, 5 x 5000 and
    # 9000 ns.  P50 is the 7th (4000 ns, bucket [3840, 4095]), P90 the 12th
    # (5000, [4608, 5119]), P99 the 13th (9000, [8192, 9215]): each shown
    # as its bucket's middle.  READ_CR4: 100, 200, 200, 300 ns; P90 and P99
    # are the 4th, whose bucket's middle (303) is above the maximum.
    assert text(PID5, latency=True) == [
        "KVM_EXIT_REASON                     COUNT        AVG_us     P50_us"
        "     P90_us     P99_us     MAX_us",
        "IOIO                                13              4.1        4.0"
        "        4.9        8.7        9.0",
        "READ_CR4                            4               0.2        0.2"
        "        0.3        0.3        0.3",
        "NPF                                 3                 -          -"
        "          -          -          -",
        "HLT                                 1                 -          -"
        "          -          -          -",
    ]


def test_latency_percentiles_are_bucket_middles_capped_by_the_maximum():
    ioio = snap().latency[(5, 6, 2, IOIO)]
    assert ioio.percentiles_ns() == [(4608 + 5119) // 2, (4608 + 5119) // 2,
                                     (8192 + 9215) // 2]
    assert kvmexit.Latency().percentile_ns(99) == 0
    merged = ioio + lat(400, 600, 2000)
    assert (merged.count, merged.total_ns, merged.max_ns) == (13, 53000, 9000)
    assert merged.hist == [a + b for a, b in zip(
        ioio.hist, lat(400, 600, 2000).hist)]


def test_interval_counts_are_differences_and_max_stays_cumulative():
    earlier = kvmexit.Snapshot(
        {(5, 6, 2, IOIO): 4, (5, 6, 2, HLT): 1}, {}, [1, 0, 0, 0],
        {(5, 6, 2, IOIO): lat(4000, 4000, 4000, 4000)})
    now = snap()
    now.lost = [3, 0, 0, 0]
    later = now.minus(earlier)
    assert later.counts[(5, 6, 2, IOIO)] == 6
    assert (5, 6, 2, HLT) not in later.counts
    assert later.lost == [2, 0, 0, 0]
    interval = later.latency[(5, 6, 2, IOIO)]
    assert (interval.count, interval.total_ns, interval.max_ns) == \
        (6, 34000, 9000)
    assert interval.hist == lat(*[5000] * 5 + [9000]).hist


def test_show_vcpu_and_comm_columns_in_the_all_view():
    assert text(ALL, show_vcpu=True, comm=True) == [
        "PID      %-32s TID      VCPU     KVM_EXIT_REASON" % "COMM" +
        " " * 21 + "COUNT",
        "5        %-32s 6        0        %-35s %-8u" % (
            "qemu-system-x86 guest=vm1", "IOIO", 10),
        "5        %-32s 6        0        %-35s %-8u" % (
            "qemu-system-x86 guest=vm1", "READ_CR4", 4),
        "5        %-32s 6        0        %-35s %-8u" % (
            "qemu-system-x86 guest=vm1", "HLT", 1),
        "5        %-32s 7        1        %-35s %-8u" % (
            "qemu-system-x86 guest=vm1", "IOIO", 3),
        "5        %-32s 7        1        %-35s %-8u" % (
            "qemu-system-x86 guest=vm1", "NPF", 3),
        "9        %-32s 10       -        %-35s %-8u" % ("crosvm", "IOIO", 2),
    ]


def test_top_keeps_the_largest_reasons_of_each_thread():
    assert text(ALL, top=1) == [
        "PID      TID      KVM_EXIT_REASON                     COUNT",
        "5        6        %-35s %-8u" % ("IOIO", 10),
        "5        7        %-35s %-8u" % ("IOIO", 3),   # tie: lower code
        "9        10       %-35s %-8u" % ("IOIO", 2),
    ]
    assert text(PID5, top=2)[1:] == ["%-35s %-8u" % ("IOIO", 13),
                                     "%-35s %-8u" % ("READ_CR4", 4)]


def test_timestamp_and_interval_separate_reports():
    lines = text(PID5, timestamp=True, interval=1)
    assert lines[0] == ""
    assert len(lines[1]) == 8 and lines[1][2] == lines[1][5] == ":"
    assert lines[2].startswith("KVM_EXIT_REASON")


def record_report(fmt, **opts):
    out = io.StringIO()
    report = kvmexit.RecordReport(
        ALL, NAMES, kvmexit.Probe("raw-new", "x"),
        kvmexit.ReportOptions(**{fmt: True}, **opts), out)
    report.comms.update({5: "qemu-system-x86", 9: "crosvm"})
    report.report(snap(), 100.5, 101.25)
    return out.getvalue()


def test_json_schema_one_object_per_report():
    report = json.loads(record_report("json", latency=True))
    assert {k: v for k, v in report.items() if k != "rows"} == {
        "context": "all threads", "view": "all", "probe": "raw-new",
        "start": 100.5, "end": 101.25, "cumulative": False, "lost": 0}
    assert report["rows"][0] == {
        "pid": 5, "tid": 6, "vcpu_id": 0, "comm": "qemu-system-x86",
        "isa": "svm", "exit_code": IOIO, "name": "IOIO", "count": 10,
        "avg_ns": 5000, "p50_ns": 4863, "p90_ns": 4863, "p99_ns": 8703,
        "max_ns": 9000}
    assert report["rows"][2]["name"] == "HLT"
    assert report["rows"][2]["avg_ns"] is None
    assert report["rows"][-1]["vcpu_id"] is None
    assert [(r["tid"], r["name"]) for r in report["rows"]] == [
        (6, "IOIO"), (6, "READ_CR4"), (6, "HLT"), (7, "IOIO"), (7, "NPF"),
        (10, "IOIO")]


def test_csv_header_once_then_rows():
    table = list(csv.reader(io.StringIO(record_report("csv"))))
    assert table[0] == ["end", "pid", "tid", "vcpu_id", "comm", "isa",
                        "exit_code", "name", "count"]
    assert table[1] == ["101.250000", "5", "6", "0", "qemu-system-x86",
                        "svm", "123", "IOIO", "10"]
    assert table[-1] == ["101.250000", "9", "10", "", "crosvm", "svm", "123",
                         "IOIO", "2"]


def test_process_name_with_qemu_guest_name(tmp_path):
    for pid, comm, argv in ((5, "qemu-system-x86", ["qemu-system-x86_64",
                                                    "-name",
                                                    "guest=vm1,debug-threads=on"]),
                            (6, "qemu-kvm", ["qemu-kvm", "-name", "db"]),
                            (7, "crosvm", ["crosvm", "run"])):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
        (tmp_path / str(pid) / "cmdline").write_text("\0".join(argv) + "\0")
    assert kvmexit.process_name(5, str(tmp_path)) == \
        "qemu-system-x86 guest=vm1"
    assert kvmexit.process_name(6, str(tmp_path)) == "qemu-kvm guest=db"
    assert kvmexit.process_name(7, str(tmp_path)) == "crosvm"
    assert kvmexit.process_name(8, str(tmp_path)) == "?"
