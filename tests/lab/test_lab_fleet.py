"""VMs that come and go: nothing lost, in the interval reports and in a
real Prometheus.

Boots the lab once (tests/lab/fleet.py): 20 VMs of 2 vCPUs run one after
another under two kvmexits with a thread table of 4 -- one printing JSON
every second, one serving /metrics to Prometheus (restarted halfway) --
while a hist trigger on kvm:kvm_exit counts the same exits in the kernel.
Without retiring the threads of ended VMs the table would be full after
the second VM.  Runs in CI; if the lab cannot start, the tests fail with
the reason.
"""

import json
import os
import sys

import pytest
import yaml

import dashboard
import kvmexit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fleet  # noqa: E402
from fixtures import Scenario  # noqa: E402

IOIO, HLT, READ_CR4, WRITE_CR4 = 0x7b, 0x78, 0x04, 0x14
NAMES = kvmexit.ReasonNames()


SCENARIO = Scenario("fleet", script="tests/lab/fleet.py",
                    env="KVMEXIT_LAB_FLEET")


@pytest.fixture(scope="module")
def lab(lab_runs):
    return lab_runs.results(SCENARIO, "fleet.json")


def vcpus(lab):
    """{tid: (vm name, pid, vCPU index)} of every VM's vCPU threads."""
    return {v["tid"]: (name, g["pid"], v["index"])
            for name, g in lab["guests"].items() for v in g["vcpus"]}


def kernel(lab):
    """{(pid, tid, code): count} from the hist trigger, vCPU threads only
    (the lab's own threads do not exit to KVM)."""
    threads = vcpus(lab)
    counts = {}
    for key, n in lab["hist"].items():
        tid, code = map(int, key.split(","))
        if tid in threads:
            counts[(threads[tid][1], tid, code)] = n
    return counts


def tracer(lab, name):
    t = lab["tracers"][name]
    assert t["status"] == 0, t
    assert "Traceback" not in t["stderr"], t["stderr"]
    return t


def test_twenty_vms_of_two_vcpus_ran_one_after_another(lab):
    assert sorted(lab["guests"]) == [fleet.vm_name(i)
                                     for i in range(fleet.VMS)]
    assert set(lab["guest_status"].values()) == {0}
    assert len(vcpus(lab)) == fleet.VMS * fleet.VCPUS


def test_every_vcpu_made_its_exits_in_the_kernel_count(lab):
    counts = kernel(lab)
    for name, g in lab["guests"].items():
        for v in g["vcpus"]:
            key = lambda code: (g["pid"], v["tid"], code)
            assert counts[key(IOIO)] == v["expected"]["IOIO"], name
            assert counts[key(READ_CR4)] == v["cr4"], name
            assert counts[key(WRITE_CR4)] == v["cr4"], name
            assert counts[key(HLT)] == 1, name


def test_interval_reports_add_up_to_every_exit_with_nothing_lost(lab):
    t = tracer(lab, "json")
    reports = [json.loads(line) for line in t["stdout"].splitlines()]
    assert len(reports) >= fleet.VMS * fleet.GAP
    assert [r["lost"] for r in reports] == [0] * len(reports)
    total = {}
    for r in reports:
        for row in r["rows"]:
            key = (row["pid"], row["tid"], row["exit_code"])
            total[key] = total.get(key, 0) + row["count"]
    assert total == kernel(lab)
    assert "were not counted" not in t["stderr"]


def test_prometheus_has_every_exit_per_vm_vcpu_and_reason(lab):
    threads = vcpus(lab)
    expected = {}
    for (pid, tid, code), n in kernel(lab).items():
        vm, _, vcpu = threads[tid]
        expected[(vm, str(pid), str(vcpu), "svm", NAMES.name(2, code))] = n
    got = {(m["vm"], m["pid"], m["vcpu"], m["isa"], m["reason"]): value
           for m, value in lab["promql"]["exits"]}
    assert got == expected


def test_promql_sums_per_vm_and_reason(lab):
    threads = vcpus(lab)
    expected = {}
    for (_, tid, code), n in kernel(lab).items():
        key = (threads[tid][0], NAMES.name(2, code))
        expected[key] = expected.get(key, 0) + n
    got = {(m["vm"], m["reason"]): value
           for m, value in lab["promql"]["per_vm_reason"]}
    assert got == expected
    assert got[("vm07", "IOIO")] == (30 + 14) + (30 + 14 + 1)


def test_prometheus_saw_nothing_lost(lab):
    lost = {m["why"]: value for m, value in lab["promql"]["lost"]}
    assert set(lost) == {kvmexit.lost_label(m) for m, _ in kvmexit.LOST}
    assert set(lost.values()) == {0}


def test_series_of_ended_vms_are_still_served_within_the_grace_period(lab):
    # All VMs ended seconds ago, well within the default grace period.
    live = {m["vm"] for m, _ in lab["promql"]["live"]}
    assert live == {fleet.vm_name(i) for i in range(fleet.RESTART_AFTER,
                                                    fleet.VMS)}


def test_exporter_says_where_it_listens_and_ends_cleanly_on_sigterm(lab):
    for name in ("exporter_first", "exporter"):
        t = tracer(lab, name)
        assert "kvmexit: listening on http://%s/metrics" % fleet.EXPORTER \
            in t["stderr"].splitlines()
        assert "were not counted" not in t["stderr"]
    assert [m["job"] for m, v in lab["promql"]["up"] if v == 1] == \
        ["kvmexit"]
    assert len(lab["promql"]["build"]) == 1


# The operator's kit (deploy/) on these exits, from an exporter with
# --latency: every panel and recording rule has series to read.


def rules():
    with open(fleet.RULES) as f:
        return [rule for group in yaml.safe_load(f)["groups"]
                for rule in group["rules"]]


def answers(lab, part):
    """[(query, series)] of one part of the kit; every query evaluated."""
    for query, series, error in lab["kit"][part]:
        assert error is None, (query, error)
    return [(query, series) for query, series, _ in lab["kit"][part]]


def test_every_dashboard_query_returns_series_on_real_exits(lab):
    got = answers(lab, "dashboard")
    assert [q for q, _ in got] == dashboard.dashboard_queries(
        fleet.DASHBOARD)
    for query, series in got:
        assert series, query
    by_query = dict(got)
    assert by_query['sum(up{job="kvmexit", instance=~".*"})'] == \
        [[{}, 1.0]]
    # Fewer than 10 reasons: the top 10 are every reason the kernel saw.
    top = by_query['topk(10, sum by (reason) (increase(kvm_exits_total'
                   '{instance=~".*", vm=~".*"}[1h])))']
    assert {m["reason"] for m, _ in top} == {
        NAMES.name(2, code) for _, _, code in kernel(lab)}


def test_every_recording_rule_returns_and_records_series(lab):
    records = [r for r in rules() if "record" in r]
    exprs = dict(answers(lab, "rules"))
    recorded = dict(answers(lab, "recorded"))
    assert sorted(recorded) == sorted(r["record"] for r in records)
    for rule in records:
        assert exprs[rule["expr"].strip()], rule
        assert recorded[rule["record"]], rule


def test_no_alert_holds_on_a_fleet_that_lost_nothing(lab):
    exprs = dict(answers(lab, "rules"))
    alerts = [r for r in rules() if "alert" in r]
    assert len(alerts) == 4
    for rule in alerts:
        assert exprs[rule["expr"].strip()] == [], rule["alert"]
    # Active now, not at the scrape the answers were taken at: one scrape
    # that ran out of time on a starved machine makes KvmexitDown pending
    # for a while (its `for` is 5 minutes), and nothing else may be.
    assert [(a["labels"]["alertname"], a["state"])
            for a in lab["kit"]["alerts"]
            if (a["labels"]["alertname"], a["state"]) !=
            ("KvmexitDown", "pending")] == []
