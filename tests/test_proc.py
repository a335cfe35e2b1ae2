"""Which threads to trace: -p/-v/-a/-t/-T resolved against /proc, the
first line's context and the in-kernel filter expression.

Most tests use a fake /proc tree (tests/conftest.py: FakeProc): a QEMU
process PID 5 with threads 'qemu-system-x86', 'IO mon_iothread' and vCPU
threads 'CPU 0/KVM' .. 'CPU 11/KVM'; another QEMU process PID 30; a
non-QEMU VMM PID 40 whose vCPUs are known only from its KVM vCPU fds."""

import os
import threading

import pytest

import kvmexit
from helpers import count_vcpus


def filter_expr(sel):
    """The in-kernel filter as a C condition on (tgid, tid): what
    kernel_filter()'s macros make of it."""
    macros = sel.kernel_filter()
    if not macros:
        return "0"
    name, _, value = macros[0][2:].partition("=")
    if name == "FILTER_TGID":
        return "(tgid) != %s" % value
    assert name == "FILTER_TID_NOT_IN(tid)", macros
    return value[1:-1]

QEMU_PID = 5
OTHER_QEMU_PID = 30
VMM_PID = 40


def qemu_threads(order):
    """{tid: comm} of PID 5.  'natural': vCPU n is TID 8+n, as QEMU
    creates them.  'reversed': the vCPUs got TIDs in reverse order, so
    'CPU 10/KVM' and 'CPU 11/KVM' have lower TIDs than 'CPU 1/KVM' and a
    prefix match on 'CPU 1' would find them first."""
    threads = {5: "qemu-system-x86", 6: "qemu-system-x86",
               7: "IO mon_iothread"}
    for n in range(12):
        tid = 8 + n if order == "natural" else 19 - n
        threads[tid] = "CPU %d/KVM" % n
    return threads


def vcpu_tid(order, n):
    return 8 + n if order == "natural" else 19 - n


@pytest.fixture(params=["natural", "reversed"])
def proc(request, fake_proc):
    order = request.param
    fake_proc.process(QEMU_PID, qemu_threads(order), vcpu_fds=range(12))
    fake_proc.process(OTHER_QEMU_PID, {30: "qemu-system-x86",
                                       31: "CPU 0/KVM", 32: "CPU 3/TCG"})
    fake_proc.process(VMM_PID, {40: "firecracker", 41: "fc_vcpu 0",
                                42: "fc_vcpu 1"}, vcpu_fds=[0, 1])
    fake_proc.order = order
    return fake_proc


def select(proc, *argv):
    return kvmexit.select_threads(
        kvmexit.parse_args([str(a) for a in argv]), proc=proc.path)


def selection_fields(sel):
    return (sel.context, sel.view, sel.tgid, sel.tids, sel.vcpu,
            filter_expr(sel))


#
# The fake tree itself, read by kvmexit's helpers
#
def test_tgid_of_a_leader_and_of_a_thread(proc):
    assert kvmexit.tgid_of(5, proc.path) == 5
    assert kvmexit.tgid_of(7, proc.path) == 5
    assert kvmexit.tgid_of(31, proc.path) == 30


def test_tgid_of_a_missing_thread_is_none(proc):
    assert kvmexit.tgid_of(99, proc.path) is None


def test_tgid_of_a_status_without_tgid_is_none(fake_proc):
    os.makedirs(os.path.join(fake_proc.path, "77"))
    with open(os.path.join(fake_proc.path, "77", "status"), "w") as f:
        f.write("Name:\tx\nPid:\t77\n")
    assert kvmexit.tgid_of(77, fake_proc.path) is None


def test_thread_names_lists_every_thread_of_the_process(proc):
    names = kvmexit.thread_names(5, proc.path)
    assert sorted(names) == list(range(5, 20))
    assert names[7] == "IO mon_iothread\n"
    assert names[vcpu_tid(proc.order, 10)] == "CPU 10/KVM\n"


#
# vCPU -> TID
#
@pytest.mark.parametrize("vcpu", [0, 1, 2, 9, 10, 11])
def test_vcpu_thread_matches_the_whole_qemu_thread_name(proc, vcpu):
    assert kvmexit.vcpu_thread(5, vcpu, proc.path) == vcpu_tid(proc.order,
                                                               vcpu)


def test_vcpu_1_is_cpu_1_kvm_not_cpu_10_kvm(proc):
    sel = select(proc, "-p", 5, "-v", 1)
    names = kvmexit.thread_names(5, proc.path)
    assert [names[t] for t in sel.tids] == ["CPU 1/KVM\n"]
    assert sel.tids == [vcpu_tid(proc.order, 1)]
    assert filter_expr(sel) == "(tid) != %d" % vcpu_tid(proc.order, 1)


def test_vcpu_thread_of_a_vcpu_qemu_does_not_have_is_none(proc):
    assert kvmexit.vcpu_thread(5, 12, proc.path) is None


def test_vcpu_thread_ignores_tcg_and_other_threads(proc):
    assert kvmexit.vcpu_thread(30, 3, proc.path) is None      # CPU 3/TCG
    assert kvmexit.vcpu_thread(30, 0, proc.path) == 31
    assert kvmexit.vcpu_thread(40, 0, proc.path) is None      # fc_vcpu 0


def test_vcpu_12_of_a_12_vcpu_qemu_is_an_error(proc):
    with pytest.raises(kvmexit.Error) as exc:
        select(proc, "-p", 5, "-v", 12)
    assert str(exc.value) == "PID 5 has no vCPU 12"


def test_vcpu_fds_of_a_non_qemu_vmm(proc):
    assert kvmexit.vcpu_fds(40, proc.path) == {0, 1}
    assert kvmexit.vcpu_fds(5, proc.path) == set(range(12))
    assert kvmexit.vcpu_fds(30, proc.path) == set()


def test_vcpu_fds_of_a_process_without_fd_dir_is_empty(proc):
    assert kvmexit.vcpu_fds(99, proc.path) == set()


def test_count_vcpus_sums_the_vcpu_fds_of_all_processes(proc):
    assert count_vcpus(proc.path) == 12 + 2


def test_non_qemu_vcpu_is_selected_by_the_kernel_vcpu_id(proc):
    sel = select(proc, "-p", 40, "-v", 1)
    assert selection_fields(sel) == ("PID 40 VCPU 1", "vcpu", 40, None, 1,
                                     "(tgid) != 40")


def test_non_qemu_vcpu_it_does_not_have_is_an_error(proc):
    with pytest.raises(kvmexit.Error) as exc:
        select(proc, "-p", 40, "-v", 2)
    assert str(exc.value) == "PID 40 has no vCPU 2"


CAP_EFF = {"both": (1 << kvmexit.CAP_SYS_PTRACE) |
           (1 << kvmexit.CAP_DAC_READ_SEARCH),
           "no ptrace": 1 << kvmexit.CAP_DAC_READ_SEARCH,
           "no dac_read_search": 1 << kvmexit.CAP_SYS_PTRACE}


@pytest.mark.parametrize("caps, why", [
    ("no ptrace", "another user's process: needs CAP_SYS_PTRACE and "
     "CAP_DAC_READ_SEARCH"),
    ("no dac_read_search", "another user's process: needs CAP_SYS_PTRACE "
     "and CAP_DAC_READ_SEARCH"),
    ("both", "permission denied even with CAP_SYS_PTRACE and "
     "CAP_DAC_READ_SEARCH")])
def test_a_vcpu_behind_unreadable_fds_says_why(proc, tmp_path, monkeypatch,
                                               caps, why):
    # Root reads any fake tree: the refusal is the kernel's, stood in for.
    monkeypatch.setattr(kvmexit, "fds_hidden", lambda pid, proc: pid == 40)
    status = tmp_path / "status"
    status.write_text("Name:\tkvmexit\nCapEff:\t%016x\n" % CAP_EFF[caps])
    args = kvmexit.parse_args(["-p", "40", "-v", "2"])
    with pytest.raises(kvmexit.Error) as exc:
        kvmexit.select_readable(args, proc.path, str(status))
    assert str(exc.value) == "PID 40 has no vCPU 2: cannot read its " \
        "/proc/40/fd (%s)" % why


def test_qemu_thread_name_wins_over_the_vcpu_fds(proc):
    # PID 5 has both; the thread name gives an exact TID filter.
    sel = select(proc, "-p", 5, "-v", 3)
    assert (sel.tids, sel.tgid) == ([vcpu_tid(proc.order, 3)], None)


#
# Every view: context (the first line), view, filter
#
@pytest.mark.parametrize("argv,fields", [
    ([], ("all threads", "all", None, None, None, "0")),
    (["-p", 5], ("PID 5", "pid", 5, None, None, "(tgid) != 5")),
    (["-p", 5, "-a"], ("PID 5 and its all threads", "alltids", 5, None,
                       None, "(tgid) != 5")),
    (["-t", 7], ("TID 7", "tid", None, [7], None, "(tid) != 7")),
    (["-T", "7,8"], ("TIDS ['7', '8']", "tids", None, [7, 8], None,
                     "(tid) != 7 && (tid) != 8")),
    (["-T", "8,7"], ("TIDS ['8', '7']", "tids", None, [8, 7], None,
                     "(tid) != 8 && (tid) != 7")),
    (["-t", 31], ("TID 31", "tid", None, [31], None, "(tid) != 31")),
    (["-p", 5, "-t", 7], ("TID 7", "tid", None, [7], None, "(tid) != 7")),
    (["-p", 5, "-T", "6,7"], ("TIDS ['6', '7']", "tids", None, [6, 7],
                              None, "(tid) != 6 && (tid) != 7")),
    (["-p", 5, 3], ("PID 5", "pid", 5, None, None, "(tgid) != 5")),
])
def test_selection_of_each_view(proc, argv, fields):
    assert selection_fields(select(proc, *argv)) == fields


def test_selection_of_the_vcpu_view(proc):
    tid = vcpu_tid(proc.order, 1)
    assert selection_fields(select(proc, "-p", 5, "-v", 1)) == (
        "PID 5 VCPU 1", "vcpu", None, [tid], 1, "(tid) != %d" % tid)


def test_selection_of_vcpu_0(proc):
    tid = vcpu_tid(proc.order, 0)
    assert selection_fields(select(proc, "-p", 5, "-v", 0)) == (
        "PID 5 VCPU 0", "vcpu", None, [tid], 0, "(tid) != %d" % tid)


def test_hand_made_selection_contexts_and_filters():
    cases = [
        (kvmexit.Selection("all threads", "all"), "0"),
        (kvmexit.Selection("PID 5", "pid", tgid=5), "(tgid) != 5"),
        (kvmexit.Selection("PID 5 VCPU 1", "vcpu", tids=[9], vcpu=1),
         "(tid) != 9"),
        (kvmexit.Selection("PID 5 VCPU 1", "vcpu", tgid=5, vcpu=1),
         "(tgid) != 5"),
        (kvmexit.Selection("PID 5 and its all threads", "alltids", tgid=5),
         "(tgid) != 5"),
        (kvmexit.Selection("TID 7", "tid", tids=[7]), "(tid) != 7"),
        (kvmexit.Selection("TIDS ['7', '8']", "tids", tids=[7, 8]),
         "(tid) != 7 && (tid) != 8"),
    ]
    for sel, expr in cases:
        assert filter_expr(sel) == expr, sel.context


def test_long_tid_lists_go_to_the_bitmap():
    chain = kvmexit.Selection("x", "tids", tids=list(range(1, 4097)))
    assert chain.kernel_filter()[0].startswith(
        "-DFILTER_TID_NOT_IN(tid)=((tid) != 1 && (tid) != 2 && ")
    assert chain.kernel_filter()[0].endswith(" && (tid) != 4096)")
    bitmap = kvmexit.Selection("x", "tids", tids=list(range(1, 4098)))
    assert bitmap.kernel_filter() == ["-DFILTER_TIDS"]


def test_filter_is_built_from_integers_only():
    # A TID that is not an integer cannot reach the C source.
    with pytest.raises((ValueError, TypeError)):
        kvmexit.Selection("x", "tids", tids=["7) || (1"]).kernel_filter()
    with pytest.raises((ValueError, TypeError)):
        kvmexit.Selection("x", "pid", tgid="5 || 1").kernel_filter()


#
# Errors
#
@pytest.mark.parametrize("argv,message", [
    (["-p", 99], "no such process: PID 99"),
    (["-p", 6], "no such process: PID 6"),          # a thread, not a PID
    (["-p", 99, "-a"], "no such process: PID 99"),
    (["-t", 99], "no such thread: TID 99"),
    (["-T", "7,99"], "no such thread: TID 99"),
    (["-p", 5, "-t", 31], "TID 31 is not a thread of PID 5"),
    (["-p", 5, "-T", "7,31"], "TID 31 is not a thread of PID 5"),
    (["-p", 30, "-t", 7], "TID 7 is not a thread of PID 30"),
    (["-p", 5, "-v", 1, "-t", 7],
     "-v and -a cannot be combined with -t or -T"),
    (["-p", 5, "-a", "-T", "7,8"],
     "-v and -a cannot be combined with -t or -T"),
    (["-p", 30, "-v", 3], "PID 30 has no vCPU 3"),      # CPU 3/TCG
])
def test_selection_errors(proc, argv, message):
    with pytest.raises(kvmexit.Error) as exc:
        select(proc, *argv)
    assert str(exc.value) == message


#
# The real /proc: this test process as the VMM
#
def test_real_proc_vcpu_1_picks_the_thread_named_cpu_1_kvm(named_threads):
    pid = os.getpid()
    assert named_threads["CPU 10/KVM"] < named_threads["CPU 1/KVM"]
    sel = kvmexit.select_threads(kvmexit.parse_args(["-p", str(pid), "-v",
                                                     "1"]))
    assert selection_fields(sel) == (
        "PID %d VCPU 1" % pid, "vcpu", None, [named_threads["CPU 1/KVM"]],
        1, "(tid) != %d" % named_threads["CPU 1/KVM"])


def test_real_proc_vcpu_fds_of_this_process(kvm_vcpus):
    pid = os.getpid()
    assert kvmexit.vcpu_fds(pid) == {0, 3}
    sel = kvmexit.select_threads(kvmexit.parse_args(["-p", str(pid), "-v",
                                                     "3"]))
    assert selection_fields(sel) == ("PID %d VCPU 3" % pid, "vcpu", pid,
                                     None, 3, "(tgid) != %d" % pid)
    with pytest.raises(kvmexit.Error) as exc:
        kvmexit.select_threads(kvmexit.parse_args(["-p", str(pid), "-v",
                                                   "1"]))
    assert str(exc.value) == "PID %d has no vCPU 1" % pid


def test_real_proc_thread_of_this_process():
    pid, tid = os.getpid(), threading.get_native_id()
    assert kvmexit.tgid_of(pid) == pid
    sel = kvmexit.select_threads(kvmexit.parse_args(["-p", str(pid), "-t",
                                                     str(tid)]))
    assert selection_fields(sel) == ("TID %d" % tid, "tid", None, [tid],
                                     None, "(tid) != %d" % tid)


def test_real_proc_tid_of_another_process_is_refused():
    pid = os.getpid()
    with pytest.raises(kvmexit.Error) as exc:
        kvmexit.select_threads(kvmexit.parse_args(["-p", str(pid), "-t",
                                                   "1"]))
    assert str(exc.value) == "TID 1 is not a thread of PID %d" % pid
