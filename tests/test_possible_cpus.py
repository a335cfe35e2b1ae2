"""Per-CPU values for every possible CPU, not only the online ones.

The kernel returns a per-CPU map value for each possible CPU, in the order
of the possible list, whether or not the CPU is online now: a CPU that ran
vCPUs and went offline keeps its counts.  bcc 0.26's kvmexit read
multiprocessing.cpu_count() (online) CPUs.  Here a host with possible CPUs
'0-3,8-11' (8 of them, e.g. 4 online) is modeled: the count comes from the
kernel's list, and the aggregation takes all 8 columns."""

import io
import os

import numpy as np
import pytest

import kvmexit
from helpers import print_report

SVM = kvmexit.ISA_SVM
PID = 4242
LAYOUT = kvmexit.SVM_LAYOUT
POSSIBLE = "0-3,8-11\n"
ONLINE = "0-3\n"
NCPUS = 8


def pid_tgid(tid):
    return PID << 32 | tid


def header(isa, vcpu):
    return isa << 32 | vcpu


def col(code):
    """The word of a code's counter in a thread_counts value."""
    slot = [s for s in range(LAYOUT.slots) if LAYOUT.code(s) == code][0]
    return 1 + slot


A, B, C = pid_tgid(11), pid_tgid(12), pid_tgid(13)


def eight_cpu_maps():
    """(table keys, table [thread][cpu][word], cache [1][cpu][word]) of a
    host with 8 possible CPUs; positions 4..7 are CPUs 8..11.

    A exited on every position (0x7b: position + 1 times) and 0x400 twice
    on position 7 (CPU 11); B has 1 on position 2 and 5 in the table on
    position 6, whose cache slot holds it with 9 (newer); C is only in
    position 4's cache slot (CPU 8), 4 exits of 0x60."""
    values = np.zeros((2, NCPUS, LAYOUT.words), dtype=np.uint64)
    for pos in range(NCPUS):
        values[0, pos, 0] = header(SVM, 3)
        values[0, pos, col(0x7b)] = pos + 1
    values[0, 7, col(0x400)] = 2
    values[1, 2, 0] = values[1, 6, 0] = header(SVM, 5)
    values[1, 2, col(0x78)] = 1
    values[1, 6, col(0x78)] = 5
    cache = np.zeros((1, NCPUS, 1 + LAYOUT.words), dtype=np.uint64)
    cache[0, 6, 0] = B
    cache[0, 6, 1] = header(SVM, 5)
    cache[0, 6, 1 + col(0x78)] = 9
    cache[0, 4, 0] = C
    cache[0, 4, 1] = header(SVM, 7)
    cache[0, 4, 1 + col(0x60)] = 4
    return [A, B], values, cache


EXPECTED = {(PID, 11, SVM, 0x7b): sum(range(1, NCPUS + 1)),
            (PID, 11, SVM, 0x400): 2,
            (PID, 12, SVM, 0x78): 1 + 9,
            (PID, 13, SVM, 0x60): 4}


@pytest.fixture
def sys_cpu(tmp_path, monkeypatch):
    (tmp_path / "possible").write_text(POSSIBLE)
    (tmp_path / "online").write_text(ONLINE)
    monkeypatch.setattr(kvmexit, "POSSIBLE_CPUS", str(tmp_path / "possible"))
    return tmp_path


def test_possible_cpus_counts_the_possible_list_not_the_online_one(sys_cpu):
    assert kvmexit.parse_cpu_list(POSSIBLE) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert len(kvmexit.parse_cpu_list(ONLINE)) == 4
    assert kvmexit.possible_cpus() == NCPUS


def test_merge_sums_all_eight_columns_and_their_cache_slots():
    keys, values, cache = eight_cpu_maps()
    merged, sums, hdr = kvmexit.merge_thread_counts(
        keys, values.copy(), [int(k) for k in cache[0, :, 0]],
        cache[0, :, 1:])
    assert merged == [A, B, C]
    assert sums.shape == (3, LAYOUT.slots)
    assert int(sums[0, col(0x7b) - 1]) == 36
    assert int(sums[0, col(0x400) - 1]) == 2
    assert int(sums[1, col(0x78) - 1]) == 10
    assert int(sums[2, col(0x60) - 1]) == 4
    assert int(sums.sum()) == 36 + 2 + 10 + 4
    assert [int(h) for h in hdr] == [header(SVM, 3), header(SVM, 5),
                                     header(SVM, 7)]


@pytest.mark.parametrize("cores", [2, 3, 4, 16])
def test_merge_sums_the_same_when_split_over_cores(monkeypatch, cores):
    """A big table is summed in parts on several cores: each thread's row
    in exactly one part, a part per core (up to 8), empty parts too."""
    monkeypatch.setattr(kvmexit, "PARALLEL_SUM_BYTES", 0)
    monkeypatch.setattr(kvmexit.os, "sched_getaffinity",
                        lambda pid: set(range(cores)))
    keys, values, cache = eight_cpu_maps()
    merged, sums, hdr = kvmexit.merge_thread_counts(
        keys, values.copy(), [int(k) for k in cache[0, :, 0]],
        cache[0, :, 1:])
    assert merged == [A, B, C]
    assert int(sums[0, col(0x7b) - 1]) == 36
    assert int(sums[0, col(0x400) - 1]) == 2
    assert int(sums[1, col(0x78) - 1]) == 10
    assert int(sums[2, col(0x60) - 1]) == 4
    assert int(sums.sum()) == 36 + 2 + 10 + 4
    # Wider than the threads: every part but the last three is empty.
    big = np.arange(3 * 8 * 4, dtype=np.uint64).reshape(3, 8, 4)
    assert kvmexit.sum_over_cpus(big).tolist() == \
        big[:, :, 1:].sum(axis=1).tolist()


def test_merge_ignores_nothing_beyond_the_online_cpus():
    """Counts only on positions 4..7 (CPUs 8..11, offline now) count."""
    keys, values, cache = eight_cpu_maps()
    values[:, :4] = 0
    cache[0, :4] = 0
    _, sums, _ = kvmexit.merge_thread_counts(
        keys, values, [int(k) for k in cache[0, :, 0]], cache[0, :, 1:])
    assert int(sums[0].sum()) == 5 + 6 + 7 + 8 + 2
    assert int(sums[1].sum()) == 9
    assert int(sums[2].sum()) == 4


class FakeMaps:
    def __getitem__(self, name):
        return name.decode() if isinstance(name, bytes) else name


def test_snapshot_reads_every_map_for_all_possible_cpus(sys_cpu,
                                                        monkeypatch):
    table_keys, values, cache = eight_cpu_maps()
    rare_key = A.to_bytes(8, "little") + SVM.to_bytes(4, "little") + \
        (0x9999).to_bytes(4, "little")
    rare = np.zeros((1, NCPUS, 1), dtype=np.uint64)
    rare[0, 5, 0], rare[0, 7, 0] = 1, 2
    asked = {}

    def read_percpu(table, key_size, words, ncpus, keys=None):
        asked[table] = ncpus
        if table == "pcpu_cache":
            return keys, cache
        if table == "pcpu_kvm_stat":
            return [k.to_bytes(8, "little") for k in table_keys], \
                values.copy()
        if table == "pcpu_rare_stat":
            return [rare_key], rare
        keys = keys or []
        out = np.zeros((len(keys), ncpus, words), dtype=np.uint64)
        if table == "pcpu_lost":
            out[0, 7, 0] = 4            # lost on CPU 11
        return keys, out

    monkeypatch.setattr(kvmexit, "read_percpu", read_percpu)
    snap = kvmexit.snapshot(FakeMaps(), kvmexit.Program(
        kvmexit.Probe("raw-old", "test"),
        kvmexit.Selection("all threads", "all"), 16, LAYOUT),
        kvmexit.possible_cpus())
    assert asked and set(asked.values()) == {NCPUS}
    assert {"pcpu_cache", "pcpu_kvm_stat", "pcpu_rare_stat",
            "pcpu_lost"} <= set(asked)
    assert snap.counts == {**EXPECTED, (PID, 11, SVM, 0x9999): 3}
    assert snap.vcpu_ids == {(PID, 11): 3, (PID, 12): 5, (PID, 13): 7}
    assert snap.lost[0] == 4

    out = io.StringIO()
    print_report(kvmexit.Selection("all threads", "all"), snap,
                         kvmexit.ReasonNames(), out=out)
    assert [line.split()[-1] for line in out.getvalue().splitlines()[1:]] \
        == ["36", "3", "2", "10", "4"]


def test_read_percpu_sizes_its_buffer_for_the_possible_cpus(bcc, cpus_0_1,
                                                            threads):
    """On the real kernel: one row per possible CPU, in the possible
    list's order, as bcc's own tables see them."""
    from bcc.utils import get_possible_cpus
    ncpus = kvmexit.possible_cpus()
    assert ncpus == len(get_possible_cpus())
    assert ncpus >= len(os.sched_getaffinity(0))
    b = kvmexit.load_program(kvmexit.Program(
        kvmexit.Probe("raw-old", "test"),
        kvmexit.Selection("all threads", "all"), 16, LAYOUT))
    try:
        fd = b.load_func(b"raw_kvm_exit", bcc.BPF.RAW_TRACEPOINT).fd
        a, z = threads(2)
        a.exits(fd, 1, 0x7b, SVM, times=3)
        z.exits(fd, 1, 0x78, SVM, times=1)     # evicts a on CPU 1
        keys, values = kvmexit.read_map(b, kvmexit.THREAD_MAP, LAYOUT,
                                        ncpus)
    finally:
        b.cleanup()
    table = {int.from_bytes(k, "little"): v for k, v in zip(keys, values)}
    row = table[os.getpid() << 32 | a.tid]
    assert row.shape == (ncpus, LAYOUT.words)
    position = kvmexit.cpu_list(kvmexit.POSSIBLE_CPUS).index(1)
    assert int(row[position, col(0x7b)]) == 3
    assert int(row[:, col(0x7b)].sum()) == 3
