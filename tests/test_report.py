"""Golden reports: the exact text print_report() writes for each view, from
hand-made snapshots (pure Python, no kernel).

bcc's widths: header '[PID      TID      |TID      |TIDS     ]%-35s COUNT',
rows '[%-8u ]...%-35s %-8u' (so a row ends in the count's padding).
Order: views that collapse threads (-p, -v, -t) by count descending, then
(isa, code) ascending; per-thread views (all, -a, -T) by thread ascending
(numerically), then count descending, then (isa, code)."""

import io

import pytest

import kvmexit
from helpers import print_report

VMX, SVM = kvmexit.ISA_VMX, kvmexit.ISA_SVM
UNKNOWN = kvmexit.VCPU_ID_UNKNOWN

# A QEMU process, PID 100: 'CPU 0/KVM' is TID 101, 'CPU 1/KVM' TID 102.
QEMU = {
    (100, 101, SVM, 0x7b): 40, (100, 101, SVM, 0x78): 7,
    (100, 101, SVM, 0x400): 7, (100, 101, SVM, 0x60): 3,
    (100, 102, SVM, 0x7b): 2, (100, 102, SVM, 0x78): 12,
    (100, 102, SVM, 0x14): 1, (100, 102, SVM, 0x04): 1,
    (100, 102, SVM, 0xa3): 1,
}
QEMU_VCPUS = {(100, 101): 0, (100, 102): 1}

# Unfiltered, VMX: three threads in two processes, PIDs that sort
# differently as text (200 < 1000), an unknown code and a failed entry.
HOST = {
    (1000, 1001, VMX, 30): 5, (1000, 1001, VMX, 12): 5,
    (1000, 1001, VMX, 0x80000021): 1,
    (200, 205, VMX, 48): 9,
    (200, 203, VMX, 0x9999): 2, (200, 203, VMX, 1): 2,
}
HOST_VCPUS = {(1000, 1001): 0, (200, 205): 1, (200, 203): 0}


def report(selection, counts, vcpu_ids, names=None):
    out = io.StringIO()
    snap = kvmexit.Snapshot(dict(counts), dict(vcpu_ids), [0, 0, 0])
    print_report(selection, snap, names or kvmexit.ReasonNames(),
                         out=out)
    return out.getvalue()


def only(counts, *tids):
    return {k: v for k, v in counts.items() if k[1] in tids}


def text(*lines):
    return "".join(line + "\n" for line in lines)


#
# Each view
#
def test_all_threads_view():
    assert report(kvmexit.Selection("all threads", "all"), HOST,
                  HOST_VCPUS) == text(
        "PID      TID      KVM_EXIT_REASON                     COUNT",
        "200      203      EXTERNAL_INTERRUPT                  2       ",
        "200      203      39321                               2       ",
        "200      205      EPT_VIOLATION                       9       ",
        "1000     1001     HLT                                 5       ",
        "1000     1001     IO_INSTRUCTION                      5       ",
        "1000     1001     INVALID_STATE|FAILED_VMENTRY        1       ")


def test_all_threads_view_of_a_qemu_process():
    assert report(kvmexit.Selection("all threads", "all"), QEMU,
                  QEMU_VCPUS) == text(
        "PID      TID      KVM_EXIT_REASON                     COUNT",
        "100      101      IOIO                                40      ",
        "100      101      HLT                                 7       ",
        "100      101      NPF                                 7       ",
        "100      101      INTR                                3       ",
        "100      102      HLT                                 12      ",
        "100      102      IOIO                                2       ",
        "100      102      READ_CR4                            1       ",
        "100      102      WRITE_CR4                           1       ",
        "100      102      0xa3                                1       ")


def test_pid_view_collapses_threads_sorted_by_count():
    assert report(kvmexit.Selection("PID 100", "pid", tgid=100), QEMU,
                  QEMU_VCPUS) == text(
        "KVM_EXIT_REASON                     COUNT",
        "IOIO                                42      ",
        "HLT                                 19      ",
        "NPF                                 7       ",
        "INTR                                3       ",
        "READ_CR4                            1       ",
        "WRITE_CR4                           1       ",
        "0xa3                                1       ")


def test_pid_alltids_view_one_block_per_thread():
    sel = kvmexit.Selection("PID 100 and its all threads", "alltids",
                            tgid=100)
    assert report(sel, QEMU, QEMU_VCPUS) == text(
        "TID      KVM_EXIT_REASON                     COUNT",
        "101      IOIO                                40      ",
        "101      HLT                                 7       ",
        "101      NPF                                 7       ",
        "101      INTR                                3       ",
        "102      HLT                                 12      ",
        "102      IOIO                                2       ",
        "102      READ_CR4                            1       ",
        "102      WRITE_CR4                           1       ",
        "102      0xa3                                1       ")


# vCPU 1 (TID 102) alone, sorted by count.
VCPU1_REPORT = text(
        "KVM_EXIT_REASON                     COUNT",
        "HLT                                 12      ",
        "IOIO                                2       ",
        "READ_CR4                            1       ",
        "WRITE_CR4                           1       ",
        "0xa3                                1       ")


def test_vcpu_view_of_a_qemu_vcpu_thread():
    # The kernel counted TID 102 only.
    sel = kvmexit.Selection("PID 100 VCPU 1", "vcpu", tids=[102], vcpu=1)
    assert report(sel, only(QEMU, 102), QEMU_VCPUS) == VCPU1_REPORT


@pytest.mark.parametrize("vcpu,lines", [
    (0, ["IOIO                                40      ",
         "HLT                                 7       ",
         "NPF                                 7       ",
         "INTR                                3       "]),
    (1, ["HLT                                 12      ",
         "IOIO                                2       ",
         "READ_CR4                            1       ",
         "WRITE_CR4                           1       ",
         "0xa3                                1       "]),
    (5, []),
])
def test_vcpu_view_by_kernel_vcpu_id_keeps_that_vcpu_only(vcpu, lines):
    # A non-QEMU VMM: the kernel counted the whole process; the report
    # keeps the threads whose exits carried this vCPU id.
    sel = kvmexit.Selection("PID 100 VCPU %d" % vcpu, "vcpu", tgid=100,
                            vcpu=vcpu)
    assert report(sel, QEMU, QEMU_VCPUS) == text(
        "KVM_EXIT_REASON                     COUNT", *lines)


def test_vcpu_view_by_tid_ignores_vcpu_ids():
    # With the thread found by name, the kernel filter is exact; a vCPU id
    # the probe could not read does not hide its rows.
    sel = kvmexit.Selection("PID 100 VCPU 1", "vcpu", tids=[102], vcpu=1)
    assert report(sel, only(QEMU, 102), {(100, 102): UNKNOWN}) == \
        VCPU1_REPORT


def test_tid_view_sorted_by_count():
    assert report(kvmexit.Selection("TID 1001", "tid", tids=[1001]),
                  only(HOST, 1001), HOST_VCPUS) == text(
        "KVM_EXIT_REASON                     COUNT",
        "HLT                                 5       ",
        "IO_INSTRUCTION                      5       ",
        "INVALID_STATE|FAILED_VMENTRY        1       ")


def test_tids_view_threads_ascending_whatever_the_order_asked():
    sel = kvmexit.Selection("TIDS ['1001', '203']", "tids",
                            tids=[1001, 203])
    assert report(sel, only(HOST, 1001, 203), HOST_VCPUS) == text(
        "TIDS     KVM_EXIT_REASON                     COUNT",
        "203      EXTERNAL_INTERRUPT                  2       ",
        "203      39321                               2       ",
        "1001     HLT                                 5       ",
        "1001     IO_INSTRUCTION                      5       ",
        "1001     INVALID_STATE|FAILED_VMENTRY        1       ")


@pytest.mark.parametrize("view,header", [
    ("all", "PID      TID      KVM_EXIT_REASON                     COUNT"),
    ("pid", "KVM_EXIT_REASON                     COUNT"),
    ("alltids", "TID      KVM_EXIT_REASON                     COUNT"),
    ("vcpu", "KVM_EXIT_REASON                     COUNT"),
    ("tid", "KVM_EXIT_REASON                     COUNT"),
    ("tids", "TIDS     KVM_EXIT_REASON                     COUNT"),
])
def test_no_exits_print_the_header_only(view, header):
    sel = kvmexit.Selection("x", view, tgid=100, tids=[101], vcpu=0)
    assert report(sel, {}, {}) == header + "\n"


#
# Sorting and widths
#
def test_collapsed_ties_go_by_isa_then_code():
    counts = {(9, 9, SVM, 0x7b): 4, (9, 9, SVM, 0x78): 4,
              (9, 9, VMX, 30): 4, (9, 9, VMX, 12): 4, (9, 9, SVM, 0x400): 5}
    assert report(kvmexit.Selection("PID 9", "pid", tgid=9), counts,
                  {}) == text(
        "KVM_EXIT_REASON                     COUNT",
        "NPF                                 5       ",
        "HLT                                 4       ",
        "IO_INSTRUCTION                      4       ",
        "HLT                                 4       ",
        "IOIO                                4       ")


def test_threads_sort_numerically_and_reasons_by_count_within_each():
    counts = {(10, 10, SVM, 0x78): 1, (10, 9, SVM, 0x78): 1,
              (10, 100, SVM, 0x78): 1, (10, 9, SVM, 0x7b): 3}
    assert report(kvmexit.Selection("PID 10 and its all threads",
                                    "alltids", tgid=10), counts, {}) == text(
        "TID      KVM_EXIT_REASON                     COUNT",
        "9        IOIO                                3       ",
        "9        HLT                                 1       ",
        "10       HLT                                 1       ",
        "100      HLT                                 1       ")


def test_large_ids_and_counts_keep_their_digits():
    counts = {(4194303, 4194302, SVM, 0x7b): 12345678901}
    assert report(kvmexit.Selection("all threads", "all"), counts,
                  {}) == text(
        "PID      TID      KVM_EXIT_REASON                     COUNT",
        "4194303  4194302  IOIO                                12345678901")


def test_kernel_names_fill_the_gaps_in_the_report():
    names = kvmexit.ReasonNames({84: "MSR_READ_IMM"}, {0xa6: "IDLE_HALT"})
    counts = {(7, 7, VMX, 84): 2, (7, 8, SVM, 0xa6): 1}
    assert report(kvmexit.Selection("all threads", "all"), counts, {},
                  names) == text(
        "PID      TID      KVM_EXIT_REASON                     COUNT",
        "7        7        MSR_READ_IMM                        2       ",
        "7        8        IDLE_HALT                           1       ")


#
# report_rows: the order itself
#
def test_report_rows_of_collapsed_and_grouped_views():
    snap = kvmexit.Snapshot(dict(QEMU), dict(QEMU_VCPUS), [0, 0, 0])
    assert kvmexit.report_rows(kvmexit.Selection("PID 100", "pid",
                                                 tgid=100), snap)[:3] == [
        (None, SVM, 0x7b, 42), (None, SVM, 0x78, 19), (None, SVM, 0x400, 7)]
    assert kvmexit.report_rows(kvmexit.Selection("all", "all"),
                               snap)[:2] == [
        ((100, 101), SVM, 0x7b, 40), ((100, 101), SVM, 0x78, 7)]


#
# Snapshot arithmetic and lost exits
#
def test_snapshot_minus_gives_the_counts_of_the_interval():
    earlier = kvmexit.Snapshot({(1, 2, SVM, 0x7b): 5, (1, 2, SVM, 0x78): 1},
                               {(1, 2): 0}, [1, 0, 0])
    later = kvmexit.Snapshot({(1, 2, SVM, 0x7b): 9, (1, 2, SVM, 0x78): 1,
                              (1, 3, SVM, 0x60): 2}, {(1, 2): 0, (1, 3): 1},
                             [3, 0, 2])
    interval = later.minus(earlier)
    assert interval.counts == {(1, 2, SVM, 0x7b): 4, (1, 3, SVM, 0x60): 2}
    assert interval.lost == [2, 0, 2]
    assert interval.vcpu_ids == {(1, 2): 0, (1, 3): 1}


def test_lost_exits_are_warned_about_on_stderr(capsys):
    kvmexit.warn_lost(kvmexit.Snapshot({}, {}, [3, 0, 1]))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "kvmexit: warning: 3 exits were not counted: the thread table was "
        "full (raise --max-threads)",
        "kvmexit: warning: 1 exits were not counted: their exit reason "
        "could not be read"]


def test_no_lost_exits_no_warning(capsys):
    kvmexit.warn_lost(kvmexit.Snapshot({}, {}, [0, 0, 0]))
    assert capsys.readouterr() == ("", "")
