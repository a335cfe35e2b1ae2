"""A VM of 11 vCPUs started after kvmexits with a thread table of 4:
counted exactly in the text report, the JSON reports and a real
Prometheus, the table grown while tracing, nothing lost.

Boots the lab once (tests/lab/growth.py); the kernel's own count is a
hist trigger on kvm:kvm_exit.  Without the free table its 11 threads would
find room for 4.  Runs in CI; if the lab cannot start, the tests fail with
the reason.
"""

import json
import os
import sys

import pytest

import kvmexit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import growth  # noqa: E402
from fixtures import Scenario  # noqa: E402

IOIO, HLT, READ_CR4, WRITE_CR4 = 0x7b, 0x78, 0x04, 0x14
NAMES = kvmexit.ReasonNames()


SCENARIO = Scenario("growth", script="tests/lab/growth.py",
                    env="KVMEXIT_LAB_GROWTH")


@pytest.fixture(scope="module")
def lab(lab_runs):
    return lab_runs.results(SCENARIO, "growth.json")


def vcpus(lab):
    """{tid: vCPU index} of the VM's vCPU threads."""
    return {v["tid"]: v["index"] for v in lab["guest"]["vcpus"]}


def kernel(lab):
    """{(tid, code): count} from the hist trigger, vCPU threads only."""
    threads = vcpus(lab)
    counts = {}
    for key, n in lab["hist"].items():
        tid, code = map(int, key.split(","))
        if tid in threads:
            counts[(tid, code)] = n
    return counts


def tracer(lab, name):
    t = lab["tracers"][name]
    assert t["status"] == 0, t
    assert "Traceback" not in t["stderr"], t["stderr"]
    assert "were not counted" not in t["stderr"]
    assert "cannot grow" not in t["stderr"]
    return t


def test_eleven_vcpus_made_their_exits_in_the_kernel_count(lab):
    assert lab["guest_status"] == 0
    assert sorted(vcpus(lab).values()) == list(range(growth.VCPUS))
    counts = kernel(lab)
    for v in lab["guest"]["vcpus"]:
        assert counts[(v["tid"], IOIO)] == v["expected"]["IOIO"]
        assert counts[(v["tid"], READ_CR4)] == v["cr4"]
        assert counts[(v["tid"], WRITE_CR4)] == v["cr4"]
        assert counts[(v["tid"], HLT)] == 1


def test_the_text_report_has_every_exit(lab):
    pid = lab["guest"]["pid"]
    got = {}
    for line in tracer(lab, "text")["stdout"].splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == str(pid):
            reason = fields[-2]
            got[(int(fields[1]), reason)] = int(fields[-1])
            assert " ".join(fields[2:-2]).endswith("guest=" + growth.VM)
    assert got == {(tid, NAMES.name(2, code)): n
                   for (tid, code), n in kernel(lab).items()}


def test_the_json_reports_add_up_to_every_exit(lab):
    reports = [json.loads(line) for line in
               tracer(lab, "json")["stdout"].splitlines()]
    assert [r["lost"] for r in reports] == [0] * len(reports)
    total = {}
    for r in reports:
        for row in r["rows"]:
            if row["pid"] == lab["guest"]["pid"]:
                key = (row["tid"], row["exit_code"])
                total[key] = total.get(key, 0) + row["count"]
    assert total == kernel(lab)


def test_prometheus_has_every_exit_and_the_grown_table(lab):
    tracer(lab, "exporter")
    threads = vcpus(lab)
    pid = str(lab["guest"]["pid"])
    expected = {(growth.VM, pid, str(threads[tid]), "svm",
                 NAMES.name(2, code)): n
                for (tid, code), n in kernel(lab).items()}
    got = {(m["vm"], m["pid"], m["vcpu"], m["isa"], m["reason"]): value
           for m, value in lab["promql"]["exits"]}
    assert got == expected
    assert {v for _, v in lab["promql"]["lost"]} == {0}
    # 4, the free 8, and the 16 added once a thread entered the 8.
    assert [v for _, v in lab["promql"]["capacity"]] == [4 + 8 + 16]
    assert [v for _, v in lab["promql"]["at_limit"]] == [0]
