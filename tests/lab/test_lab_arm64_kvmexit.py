"""kvmexit on real arm64 exits: every view against the kernel's own count
and the exits the VMs promise.

    /usr/bin/python3 -m pytest -v tests/lab/test_lab_arm64_kvmexit.py (root)

Boots the arm64 lab once (tests/lab/arm64_kvmexit.py, which shares the
boot with the other arm64 scenarios): VMs of tests/lab/arm64_guest.py with
exactly known traps run while a kvmexit per view traces them, and a hist
trigger on kvm:kvm_exit (thread, ret, esr_ec) counts the same exits in the
kernel.  Each test checks one view against those counts.  It never skips:
if the lab cannot run, it fails saying why.
"""

import csv
import functools
import io
import json
import os
import re
import sys

import pytest

import kvmexit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixtures  # noqa: E402
from fixtures import FIRST, NAMES, Scenario, tid_of, tracer  # noqa: E402
from fixtures import report_rows as rows  # noqa: E402

ARM64 = kvmexit.ISA_ARM64
IRQ = kvmexit.ARM64_NON_TRAP_BASE + 0

SCENARIO = Scenario("arm64-kvmexit", script="tests/lab/arm64_kvmexit.py",
                    lab="arm64", timeout=2700,
                    env="KVMEXIT_LAB_ARM64_KVMEXIT")


@pytest.fixture(scope="module")
def lab(lab_runs):
    return lab_runs.results(SCENARIO, "arm64_kvmexit.json")


def code_of(entry):
    return kvmexit.arm64_code(entry["ret"], entry["esr_ec"])


def kernel(lab, guest=None, tids=None):
    """{(pid, tid, code): count} from the hist trigger (thread, ret,
    esr_ec)."""
    hist = [(row["common_pid"], code_of(row), row["count"])
            for row in lab["hist"]]
    return fixtures.kernel_counts(lab, hist, guest, tids)


collapsed = functools.partial(fixtures.collapsed, isa=ARM64)
per_thread = functools.partial(fixtures.per_thread, isa=ARM64)


def test_vms_made_exactly_the_promised_exits_and_only_irqs_besides(lab):
    for name, g in lab["guests"].items():
        assert lab["guest_status"][name] == 0
        for v in g["vcpus"]:
            counts = {code: n for (_, _, code), n in
                      kernel(lab, name, {v["tid"]}).items()}
            promised = {}
            for entry in v["expected_events"]["kvm_exit"]:
                code = code_of(entry)
                promised[code] = promised.get(code, 0) + entry["count"]
            assert {c: n for c, n in counts.items() if c != IRQ} == \
                promised, (name, v["index"])


def test_the_traps_have_their_esr_class_names(lab):
    names = {name for name, _ in collapsed(kernel(lab))}
    assert {"DABT_LOW", "HVC64", "SMC64", "SYS64", "WFx",
            "IABT_LOW"} <= names <= {"DABT_LOW", "HVC64", "SMC64", "SYS64",
                                     "WFx", "IABT_LOW", "IRQ"}


def test_no_filter_prints_every_vcpu_thread_as_the_kernel_counted(lab):
    fixtures.check_all_threads(tracer(lab, "all"), kernel(lab), ARM64)


def test_raw_tracepoint_is_default_and_agrees_with_tracepoint(lab):
    raw, tp = tracer(lab, "all"), tracer(lab, "all_tracepoint")
    assert "kvmexit: probe: raw-arm64 (arm64: kvm_exit(ret, esr_ec, "\
        "vcpu_pc) passes the exit's kind and class)\n" in raw["stderr"]
    assert "kvmexit: probe: tracepoint (asked for with --probe " \
        "tracepoint)\n" in tp["stderr"]
    assert rows(raw["stdout"], 2) == rows(tp["stdout"], 2)
    threads = sum(len(g["vcpus"]) for g in lab["guests"].values())
    assert len({r[1] for r in rows(raw["stdout"], 2)}) == threads


def test_pid_collapses_its_threads_sorted_by_count(lab):
    fixtures.check_one_list(tracer(lab, "pid"),
                            "PID %d" % lab["guests"]["qemu"]["pid"],
                            kernel(lab, "qemu"), ARM64)


def test_pid_alltids_lists_each_thread(lab):
    fixtures.check_pid_alltids(tracer(lab, "pid_alltids"),
                               lab["guests"]["qemu"]["pid"],
                               kernel(lab, "qemu"), ARM64)


def test_vcpu_picks_the_qemu_named_thread(lab):
    t = tracer(lab, "vcpu1")
    tid = tid_of(lab, "qemu", 1)
    fixtures.check_one_list(t, "PID %d VCPU 1" % lab["guests"]["qemu"]["pid"],
                            kernel(lab, "qemu", {tid}), ARM64)
    got = rows(t["stdout"], 0)
    assert {("SYS64", 5), ("HVC64", 3), ("SMC64", 2), ("WFx", 2)} <= set(got)


def test_vcpu_of_a_vmm_without_qemu_names_is_refused(lab):
    t = lab["tracers"]["vcpu_other"]
    assert (t["status"], t["stdout"]) == (1, "")
    assert t["stderr"] == "kvmexit: PID %d has no thread named 'CPU 1/KVM'," \
        " and the raw-arm64 probe cannot see vCPU ids\n" \
        % lab["guests"]["other"]["pid"]


def test_tid_shows_one_thread_on_the_tracepoint(lab):
    t = tracer(lab, "tid")
    tid = tid_of(lab, "qemu", 2)
    fixtures.check_one_list(t, "TID %d" % tid, kernel(lab, "qemu", {tid}),
                            ARM64)
    got = rows(t["stdout"], 0)
    assert ("HVC64", 6) in got and ("DABT_LOW", 6) in got


def test_tids_lists_the_threads_of_two_vms(lab):
    tids = tid_of(lab, "qemu", 0), tid_of(lab, "small", 1)
    fixtures.check_tids(tracer(lab, "tids"), tids,
                        kernel(lab, tids=set(tids)), ARM64)


def test_duration_csv_and_names_on_the_tracepoint(lab):
    t = tracer(lab, "duration_csv")
    pid = lab["guests"]["small"]["pid"]
    assert t["stderr"] == FIRST + "PID %d (python3) after sleeping 60 " \
        "secs.\n" % pid
    table = list(csv.DictReader(io.StringIO(t["stdout"])))
    assert list(table[0]) == ["end", "pid", "tid", "vcpu_id", "comm", "isa",
                              "exit_code", "name", "count"]
    got = {(int(r["pid"]), int(r["tid"]), int(r["exit_code"])):
           int(r["count"]) for r in table}
    assert got == kernel(lab, "small")
    assert {(r["comm"], r["isa"], r["vcpu_id"]) for r in table} == \
        {("python3", "arm64", "")}
    assert [r["name"] for r in table] == [
        name for _, _, name, _ in per_thread(kernel(lab, "small"), True)]


def test_intervals_of_json_with_latency_add_up_to_the_whole_run(lab):
    t = tracer(lab, "interval_json")
    reports = [json.loads(line) for line in t["stdout"].splitlines()]
    assert len(reports) >= 2
    pid = lab["guests"]["qemu"]["pid"]
    total, latency = {}, {}
    for report in reports:
        assert (report["context"], report["view"], report["probe"],
                report["lost"]) == ("PID %d" % pid, "pid", "raw-arm64", 0)
        for r in report["rows"]:
            key = (r["pid"], r["tid"], r["exit_code"])
            total[key] = total.get(key, 0) + r["count"]
            # No vCPU ids on arm64's kvm_exit: -v goes by QEMU's names.
            assert r["vcpu_id"] is None
            assert (r["isa"], r["name"]) == (
                "arm64", NAMES.name(ARM64, r["exit_code"]))
            if r["max_ns"] is not None:
                assert 0 < r["p50_ns"] <= r["p90_ns"] <= r["p99_ns"] <= \
                    r["max_ns"]
                assert 0 < r["avg_ns"] <= r["max_ns"]
                latency[r["name"]] = latency.get(r["name"], 0) + 1
    assert total == kernel(lab, "qemu")
    # KVM answers HVCs and register reads itself; each was timed.
    assert {"HVC64", "SYS64", "DABT_LOW"} <= set(latency)


def scraped(lab, family):
    """{labels as a dict's items: value} of the family's samples."""
    found = {}
    for name, labels, value in re.findall(r"^(\w+)\{([^}]*)\} (\S+)$",
                                          lab["metrics"], re.M):
        if name == family:
            found[frozenset(re.findall(r'(\w+)="([^"]*)"', labels))] = \
                float(value)
    return found


def test_prometheus_serves_the_exits_with_isa_arm64(lab):
    assert lab["tracers"]["prometheus"]["status"] == 0
    got = {}
    for labels, n in scraped(lab, "kvm_exits_total").items():
        labels = dict(labels)
        assert (labels["isa"], labels["vcpu"]) == ("arm64", "unknown")
        key = (int(labels["pid"]), labels["reason"])
        got[key] = got.get(key, 0) + n
    want = {}
    for (pid, _, code), n in kernel(lab).items():
        key = (pid, NAMES.name(ARM64, code))
        want[key] = want.get(key, 0) + n
    assert got == want
    build = dict(next(iter(scraped(lab, "kvmexit_build_info"))))
    assert build["probe"] == "raw-arm64"
    assert build["slots"] == str(kvmexit.ARM64_LAYOUT.slots)
    latency = scraped(lab, "kvm_exit_handling_seconds_count")
    assert {dict(k)["isa"] for k in latency} == {"arm64"}
    assert {dict(k)["reason"] for k in latency} >= {"HVC64", "SYS64"}
