"""--detail in Python: decoding sub-keys, the reports (text, JSON, CSV),
intervals, --top, and the probe it takes.  Hand-made snapshots; the kernel
side is in test_kernel_detail.py, real exits in the lab."""

import csv
import io
import json

import pytest

import kvmexit
from helpers import assert_one_error_line, first_line, program, run_tool

SVM, VMX = kvmexit.ISA_SVM, kvmexit.ISA_VMX
IOIO, MSR, HLT, NPF = 0x7b, 0x7c, 0x78, 0x400
K = kvmexit.DETAIL_KINDS
NAMES = kvmexit.ReasonNames()


def test_kinds_are_one_table_shared_with_the_c():
    macros = kvmexit.detail_macros()
    assert "-DDETAIL" in macros
    assert "-DMAX_DETAIL=%d" % kvmexit.MAX_DETAIL in macros
    for name, number in K.items():
        assert "-DDETAIL_%s=%d" % (name.upper(), number) in macros
    assert len(set(K.values())) == len(K)


def test_intr_info_only_where_the_tracepoint_has_it(tmp_path):
    for fields, macro in (("field:u64 info2;\nfield:u32 intr_info;\n", True),
                          ("field:u64 info2;\n", False)):
        (tmp_path / "format").write_text(fields)
        assert ("-DTP_HAS_INTR_INFO" in kvmexit.detail_macros(
            str(tmp_path))) == macro


@pytest.mark.parametrize("isa, attr, label", [
    (SVM, 0x10, "port 0x70 out 1B"),
    (SVM, 0x21, "port 0x70 in 2B"),
    (SVM, 0x4d, "port 0x70 rep ins 4B"),
    (VMX, 0x00, "port 0x70 out 1B"),
    (VMX, 0x09, "port 0x70 in 2B"),
    (VMX, 0x3b, "port 0x70 rep ins 4B"),
])
def test_port_access_decoded_per_vendor(isa, attr, label):
    assert kvmexit.decode_detail(isa, 0, K["port"], 0x70, attr).label() == \
        label


@pytest.mark.parametrize("kind, isa, key, attr, label", [
    ("msr", SVM, 0x6e0, 1, "msr 0x6e0 write IA32_TSC_DEADLINE"),
    ("msr", SVM, 0x830, 1, "msr 0x830 write X2APIC_ICR"),
    ("msr", SVM, 0x80b, 1, "msr 0x80b write X2APIC_EOI"),
    ("msr", SVM, 0x838, 1, "msr 0x838 write X2APIC_TMICT"),
    ("msr", VMX, 0xc0000080, 0, "msr 0xc0000080 read IA32_EFER"),
    ("msr", VMX, 0x12345, 0, "msr 0x12345 read"),
    ("page", SVM, 0xfee00000, 0xf, "page 0xfee00000 write rsvd"),
    ("page", SVM, 0x1000, 0x14, "page 0x1000 fetch not-present"),
    ("page", SVM, 0x1000, 0x5, "page 0x1000 read"),
    ("page", VMX, 0x1000, 0x1, "page 0x1000 read"),
    ("page", VMX, 0x1000, 0x4, "page 0x1000 fetch"),
    ("mmio", SVM, 0xd0000000, 2 | 4 << 8, "mmio 0xd0000000 write 4B"),
    ("mmio", SVM, 0xd0000000, 0 | 1 << 8,
     "mmio 0xd0000000 unsat-read 1B"),
    ("mmio", VMX, 0xfe003000, 3, "mmio 0xfe003000 fast-write"),
    ("vector", SVM, 6, 0, "vector 6 exception #UD"),
    ("vector", VMX, 14, 3, "vector 14 exception #PF"),
    ("vector", VMX, 0xec, 0, "vector 236 external"),
    ("vector", VMX, 2, 2, "vector 2 nmi"),
    ("cr", VMX, 4, 0, "cr4 write"),
    ("cr", VMX, 8, 1, "cr8 read"),
    ("cr", VMX, 0, 3, "cr0 lmsw"),
    ("hypercall", SVM, 5, 0, "hypercall 5 KICK_CPU"),
    ("hypercall", VMX, 99, 0, "hypercall 99"),
    ("user", SVM, 2, 0, "to user space KVM_EXIT_IO"),
    ("user", SVM, 29, 0, "to user space KVM_EXIT_X86_RDMSR"),
    ("user", SVM, 10, 4, "to user space errno EINTR"),
])
def test_labels(kind, isa, key, attr, label):
    assert kvmexit.decode_detail(isa, 0, K[kind], key, attr).label() == label


def snap():
    """Two vCPU threads of PID 5 with MSR, port and HLT exits."""
    counts = {(5, 6, SVM, MSR): 10, (5, 6, SVM, IOIO): 3, (5, 6, SVM, HLT): 1,
              (5, 7, SVM, MSR): 4}
    detail = {(5, 6, SVM, MSR, K["msr"], 0x6e0, 1): 6,
              (5, 6, SVM, MSR, K["msr"], 0x830, 1): 3,
              (5, 6, SVM, MSR, K["msr"], 0x80b, 1): 1,
              (5, 6, SVM, IOIO, K["port"], 0x510, 0x10): 3,
              (5, 6, SVM, IOIO, K["user"], 2, 0): 3,
              (5, 6, SVM, HLT, K["user"], 5, 0): 1,
              (5, 7, SVM, MSR, K["msr"], 0x830, 1): 4}
    return kvmexit.Snapshot(counts, {(5, 6): 0, (5, 7): 1}, [0, 0, 0, 0],
                            detail=detail)


def text(selection, **opts):
    out = io.StringIO()
    kvmexit.TextReport(selection, NAMES, kvmexit.ReportOptions(
        detail=True, **opts),
                       out).report(snap(), 0, 0)
    return out.getvalue().splitlines()


ALL = kvmexit.Selection("all threads", "all")
PID5 = kvmexit.Selection("PID 5", "pid", tgid=5)


def test_text_sub_keys_under_each_reason_by_count():
    assert text(ALL) == [
        "PID      TID      KVM_EXIT_REASON                     COUNT",
        "5        6        MSR                                 10      ",
        "                    msr 0x6e0 write IA32_TSC_DEADLINE 6       ",
        "                    msr 0x830 write X2APIC_ICR        3       ",
        "                    msr 0x80b write X2APIC_EOI        1       ",
        "5        6        IOIO                                3       ",
        "                    port 0x510 out 1B                 3       ",
        "                    to user space KVM_EXIT_IO         3       ",
        "5        6        HLT                                 1       ",
        "                    to user space KVM_EXIT_HLT        1       ",
        "5        7        MSR                                 4       ",
        "                    msr 0x830 write X2APIC_ICR        4       ",
    ]


def test_collapsed_view_merges_sub_keys_of_all_threads_and_top_limits():
    assert text(PID5, top=2) == [
        "KVM_EXIT_REASON                     COUNT",
        "MSR                                 14      ",
        "  msr 0x830 write X2APIC_ICR        7       ",
        "  msr 0x6e0 write IA32_TSC_DEADLINE 6       ",
        "IOIO                                3       ",
        "  port 0x510 out 1B                 3       ",
        "  to user space KVM_EXIT_IO         3       ",
    ]


def test_sub_keys_with_latency_columns():
    lines = text(PID5, latency=True)
    assert lines[1].startswith("MSR                                 14      ")
    assert lines[1].endswith("         -          -")
    assert lines[2] == "  msr 0x830 write X2APIC_ICR        7       "


def records(fmt, **opts):
    out = io.StringIO()
    report = kvmexit.RecordReport(
        ALL, NAMES, kvmexit.Probe("tracepoint", "x"),
        kvmexit.ReportOptions(**{fmt: True}, detail=True, **opts), out)
    report.comms.update({5: "qemu-system-x86"})
    report.report(snap(), 100.5, 101.25)
    return out.getvalue()


def test_json_rows_carry_their_sub_keys():
    report = json.loads(records("json"))
    assert report["detail_lost"] == 0
    first = report["rows"][0]
    assert (first["tid"], first["name"], first["count"]) == (6, "MSR", 10)
    assert first["detail"] == [
        {"kind": "msr", "key": 0x6e0, "op": "write", "size": None,
         "name": "IA32_TSC_DEADLINE", "count": 6},
        {"kind": "msr", "key": 0x830, "op": "write", "size": None,
         "name": "X2APIC_ICR", "count": 3},
        {"kind": "msr", "key": 0x80b, "op": "write", "size": None,
         "name": "X2APIC_EOI", "count": 1}]
    ioio = report["rows"][1]
    assert ioio["detail"] == [
        {"kind": "port", "key": 0x510, "op": "out", "size": 1, "name": None,
         "count": 3},
        {"kind": "user", "key": 2, "op": None, "size": None,
         "name": "KVM_EXIT_IO", "count": 3}]


def test_csv_sub_key_rows_follow_their_reason():
    table = list(csv.DictReader(io.StringIO(records("csv"))))
    assert [(r["tid"], r["name"], r["count"], r["detail_kind"],
             r["detail_key"], r["detail_op"], r["detail_size"],
             r["detail_name"]) for r in table[:6]] == [
        ("6", "MSR", "10", "", "", "", "", ""),
        ("6", "MSR", "6", "msr", "1760", "write", "", "IA32_TSC_DEADLINE"),
        ("6", "MSR", "3", "msr", "2096", "write", "", "X2APIC_ICR"),
        ("6", "MSR", "1", "msr", "2059", "write", "", "X2APIC_EOI"),
        ("6", "IOIO", "3", "", "", "", "", ""),
        ("6", "IOIO", "3", "port", "1296", "out", "1", ""),
    ]
    # Summing the rows without a detail_kind gives the exits.
    assert sum(int(r["count"]) for r in table if not r["detail_kind"]) == 18


def test_an_interval_has_the_sub_counts_of_its_own_exits():
    earlier = snap()
    later = snap()
    later.detail = dict(later.detail)
    later.detail[(5, 6, SVM, MSR, K["msr"], 0x6e0, 1)] += 5
    later.detail_lost = 7
    earlier.detail_lost = 2
    interval = later.minus(earlier)
    assert interval.detail == {(5, 6, SVM, MSR, K["msr"], 0x6e0, 1): 5}
    assert interval.detail_lost == 5


def test_detail_takes_the_tracepoint_and_refuses_probe_raw(tmp_path):
    tp = tmp_path / "kvm_exit"
    tp.mkdir()
    (tp / "format").write_text("field:unsigned int vcpu_id;\n")
    probe = kvmexit.choose_probe("auto", str(tp), str(tmp_path), detail=True)
    assert (probe.kind, probe.why) == (
        "tracepoint", "--detail reads the tracepoint's exit information")
    with pytest.raises(kvmexit.Error) as e:
        kvmexit.choose_probe("raw", str(tp), str(tmp_path), detail=True)
    assert str(e.value) == "--detail reads the fields of the kvm_exit " \
        "tracepoint: use it without --probe raw"


def test_detail_tables_are_counted_in_the_memory_check():
    layout = kvmexit.SVM_LAYOUT
    plain = program(1024, layout).memory(2)
    assert program(1024, layout, {"detail"}).memory(2) - plain == \
        kvmexit.MAX_DETAIL * (40 + kvmexit.HASH_ELEM_OVERHEAD) + \
        1024 * (24 + kvmexit.HASH_ELEM_OVERHEAD) + (8 + 128 + 16 * 48) * 2


#
# The command
#
def test_command_with_detail_traces_and_reports(bcc):
    result = run_tool(["--detail", "--json", "1"])
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [first_line("all threads", 1)]
    report = json.loads(result.stdout)
    # This host's KVM fires no kvm_exit: an empty report, on the tracepoint.
    assert (report["probe"], report["rows"], report["lost"],
            report["detail_lost"]) == ("tracepoint", [], 0, 0)


def test_command_refuses_detail_with_probe_raw(bcc):
    assert_one_error_line(
        run_tool(["--detail", "--probe", "raw", "1"]),
        "kvmexit: --detail reads the fields of the kvm_exit tracepoint: use "
        "it without --probe raw")

