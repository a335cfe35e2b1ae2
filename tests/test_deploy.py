"""The operator's kit in deploy/: Prometheus rules and the Grafana dashboard.

The rules pass `promtool check rules` and their own unit tests on
synthetic series (`promtool test rules deploy/kvmexit-rules.test.yml`),
and those tests catch a changed threshold, window or label.  Every
dashboard query and rule expression runs on a real Prometheus (Debian's
2.42) that loads the rules and scrapes a real `kvmexit --prometheus
--latency` on this host: each parses and evaluates, the rules evaluate
healthy, no alert holds on a healthy host, and a query returns data
exactly when the exporter serves series of every metric it reads.  No VM
exits here, so queries over kvm_exits_total return nothing on the host;
the lab runs the same queries (tests/dashboard.py) over real exits.

Runs as root on the real kernel, never skipped (see conftest.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from dashboard import KitError, dashboard_queries, rule_expressions
from helpers import ROOT, SCRIPT, SYSTEM_PYTHON

sys.path.insert(0, os.path.join(ROOT, "tests", "lab"))
from prometheus import Prometheus  # noqa: E402

DEPLOY = os.path.join(ROOT, "deploy")
RULES = os.path.join(DEPLOY, "kvmexit-rules.yml")
RULE_TESTS = os.path.join(DEPLOY, "kvmexit-rules.test.yml")
DASHBOARD = os.path.join(DEPLOY, "kvmexit-dashboard.json")
PROMTOOL = "/usr/bin/promtool"
START_TIMEOUT = 90


def promtool(*argv, cwd=DEPLOY):
    return subprocess.run([PROMTOOL] + list(argv), capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def rules_of(path):
    return [rule for group in load_yaml(path)["groups"]
            for rule in group["rules"]]


def recorded(path):
    """{recorded series name: its expr}."""
    return {r["record"]: r["expr"] for r in rules_of(path) if "record" in r}


#
# The unit's exposure, as systemd rates it
#
# What systemd-analyze counts against the unit, each for a reason given in
# the unit file or README.md ("As a service"): bpf and perf_event_open,
# kvmexit's own capabilities, /lib/modules for bcc's headers, /proc for
# the VMs, and the network for the scrapes.
EXPOSED = [
    "SystemCallFilter=~@privileged", "SystemCallFilter=~@debug",
    "RootDirectory=/RootImage=", "AmbientCapabilities=",
    "CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)",
    "ProtectKernelModules=", "CapabilityBoundingSet=~CAP_BPF",
    "RestrictAddressFamilies=~AF_UNIX",
    "RestrictAddressFamilies=~AF_(INET|INET6)",
    "CapabilityBoundingSet=~CAP_SYS_PTRACE", "ProcSubset=",
    "PrivateNetwork=", "PrivateUsers=", "DeviceAllow=", "IPAddressDeny="]


def test_the_units_sandboxing_scores_as_measured():
    """`systemd-analyze security` of the unit file: 2.2 (the unit before,
    root with CAP_SYS_ADMIN, scored 3.5), and nothing exposed but what
    kvmexit needs: a directive dropped or a capability added shows."""
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager",
         "kvmexit.service"], capture_output=True, text=True, cwd=DEPLOY)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[1] for line in lines
            if line.startswith("\u2717")] == EXPOSED
    assert lines[-1] == \
        "\u2192 Overall exposure level for kvmexit.service: 2.2 OK \U0001f642"


#
# The rules, with promtool
#
def test_the_rule_file_passes_promtool_check():
    proc = promtool("check", "rules", RULES)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout
    assert proc.stdout == "Checking %s\n  SUCCESS: %d rules found\n\n" % (
        RULES, len(rules_of(RULES)))


def test_the_rules_pass_their_unit_tests():
    proc = promtool("test", "rules", RULE_TESTS)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout
    assert proc.stdout == "Unit Testing:  %s\n  SUCCESS\n\n" % RULE_TESTS


def test_every_rule_is_unit_tested():
    """Each alert is tested both firing and not; each recorded series is
    the value of some tested expression."""
    tests = load_yaml(RULE_TESTS)["tests"]
    alert_tests = [t for group in tests
                   for t in group.get("alert_rule_test", [])]
    exprs = " ".join(t["expr"] for group in tests
                     for t in group.get("promql_expr_test", []))
    for rule in rules_of(RULES):
        if "alert" in rule:
            outcomes = {bool(t["exp_alerts"]) for t in alert_tests
                        if t["alertname"] == rule["alert"]}
            assert outcomes == {True, False}, rule["alert"]
        else:
            assert re.search(r"(^|[^\w:])%s([^\w:]|$)" % re.escape(
                rule["record"]), exprs), rule["record"]


# A change to each alert that its unit tests must catch.
MUTATIONS = [
    ("for: 5m", "for: 4m"),                                     # down
    ("increase(kvmexit_lost_exits_total[15m]) > 0",
     "increase(kvmexit_lost_exits_total[15m]) > 1000"),         # lost
    ("kvmexit_table_capacity > 0.9", "kvmexit_table_capacity > 0.95"),
    ("10 * instance_vm:kvm_exits:rate5m_avg1d",
     "60 * instance_vm:kvm_exits:rate5m_avg1d"),                # norm
    ("and instance_vm:kvm_exits:rate5m > 1000",
     "and instance_vm:kvm_exits:rate5m > 10"),                  # floor
    ("sum without (pid, vcpu) (rate(kvm_exits_total[5m]))",
     "sum without (vcpu) (rate(kvm_exits_total[5m]))"),         # labels
]


@pytest.mark.parametrize("old,new", MUTATIONS)
def test_the_unit_tests_catch_a_changed_rule(tmp_path, old, new):
    with open(RULES) as f:
        text = f.read()
    assert text.count(old) == 1, old
    (tmp_path / "kvmexit-rules.yml").write_text(text.replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path)
    assert promtool("check", "rules", "kvmexit-rules.yml",
                    cwd=tmp_path).returncode == 0
    proc = promtool("test", "rules", "kvmexit-rules.test.yml", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert "FAILED:" in proc.stderr, proc.stderr


#
# tests/dashboard.py
#
def write_dashboard(tmp_path, dashboard):
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps(dashboard))
    return str(path)


def variable(name, query):
    return {"name": name, "type": "query", "query": {"query": query}}


def test_dashboard_queries_replace_variables_in_every_spelling(tmp_path):
    path = write_dashboard(tmp_path, {
        "templating": {"list": [
            {"name": "datasource", "type": "datasource",
             "query": "prometheus"},
            variable("host", "label_values(up{job=\"kvmexit\"}, instance)"),
            {"name": "vm", "type": "query",     # the older, plain string
             "query": "label_values(kvm_exits_total{instance=~\"$host\"},"
                      " vm)"}]},
        "panels": [
            {"title": "a", "targets": [
                {"expr": "rate(x{vm=~\"$vm\"}[$__rate_interval])"},
                {"expr": "increase(x{vm=~\"${vm:regex}\"}[$__range])"}]},
            {"title": "row", "type": "row", "panels": [
                {"title": "b", "targets": [
                    {"expr": "y{instance=~\"[[host]]\"}[$__interval]"}]}]},
            {"title": "text, no query", "type": "text"}]})
    assert dashboard_queries(path) == [
        "up{job=\"kvmexit\"}",
        "kvm_exits_total{instance=~\".*\"}",
        "rate(x{vm=~\".*\"}[1m])",
        "increase(x{vm=~\".*\"}[1h])",
        "y{instance=~\".*\"}[15s]"]


@pytest.mark.parametrize("dashboard,message", [
    ({"panels": [{"title": "a", "targets": [{"expr": "x{vm=~\"$vm\"}"}]}]},
     "undefined variable $vm in 'x{vm=~\"$vm\"}'"),
    ({"panels": [{"title": "a", "targets": [{"refId": "A"}]}]},
     "panel 'a': a target without expr"),
    ({"templating": {"list": [variable("vm", "query_result(x)")]}},
     "variable vm: not label_values(SELECTOR, LABEL): 'query_result(x)'"),
])
def test_dashboard_queries_refuse_what_prometheus_cannot_run(
        tmp_path, dashboard, message):
    with pytest.raises(KitError) as caught:
        dashboard_queries(write_dashboard(tmp_path, dashboard))
    assert str(caught.value) == message


def test_rule_expressions_are_every_rules_expr_in_order():
    exprs = rule_expressions(RULES)
    assert exprs == [r["expr"].strip() for r in rules_of(RULES)]
    assert exprs[0] == "sum without (pid, vcpu) (rate(kvm_exits_total[5m]))"
    assert exprs[-1] == (
        "instance_vm:kvm_exits:rate5m > 10 * instance_vm:kvm_exits:"
        "rate5m_avg1d and instance_vm:kvm_exits:rate5m > 1000")


#
# The dashboard's contents
#
def test_the_dashboard_shows_what_an_operator_needs():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    # On Grafana's 24-column grid, no two panels overlap.
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine
    queries = dashboard_queries(DASHBOARD)
    text = "\n".join(queries)
    for needed in ("sum by (vm, reason) (rate(kvm_exits_total{",
                   "topk(10, sum by (reason) (increase(kvm_exits_total{",
                   "kvmexit_lost_exits_total", "kvmexit_table_entries",
                   "kvmexit_table_capacity"):
        assert needed in text, needed
    for quantile in ("0.5", "0.9", "0.99"):
        assert "histogram_quantile(%s, sum by (reason, le) (rate(" \
            "kvm_exit_handling_seconds_bucket{" % quantile in text
    # Every panel query reads the data source the user picks.
    for p in panels:
        for t in p["targets"]:
            assert p["datasource"] == t["datasource"] == {
                "type": "prometheus", "uid": "${datasource}"}, p["title"]


#
# Every query on a real Prometheus scraping a real kvmexit
#
def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port,
                                timeout=10) as r:
        return r.read().decode()


@pytest.fixture
def exporter():
    """A real kvmexit --prometheus --latency: its port, once it answers."""
    port = free_port()
    tool = subprocess.Popen(
        [SYSTEM_PYTHON, SCRIPT, "--prometheus", "127.0.0.1:%d" % port,
         "--latency"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert tool.poll() is None, tool.stderr.read()
            try:
                scrape(port)
                break
            except (OSError, urllib.error.URLError):
                assert time.monotonic() < deadline, "no /metrics"
                time.sleep(0.5)
        yield port
    finally:
        tool.send_signal(signal.SIGTERM)
        tool.wait(timeout=30)
    assert tool.returncode == 0, tool.stderr.read()


@pytest.fixture
def prometheus(tmp_path, exporter):
    server = Prometheus(str(tmp_path / "prometheus"),
                        ["127.0.0.1:%d" % exporter], port=free_port(),
                        rules=[RULES])
    try:
        server.start()
        yield server
    finally:
        server.stop()


def served_metrics(text):
    """The metric names with at least one sample in an exposition."""
    return {re.match(r"[a-zA-Z_:][\w:]*", line).group()
            for line in text.splitlines()
            if line and not line.startswith("#")}


def metrics_read(expr, records):
    """The exporter's metrics (and `up`) an expression reads, through the
    recorded series it uses.  Label values in quotes are not names."""
    names = set()
    for name in re.findall(r"[a-zA-Z_:][\w:]*",
                           re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
        if name in records:
            names |= metrics_read(records[name], records)
        elif name == "up" or name.startswith("kvm"):
            names.add(name)
    return names


def wait_for_rules(server, timeout=60):
    """Until three scrapes are stored and every rule has been evaluated
    without error since; the rules' state then."""
    deadline = time.monotonic() + timeout
    while True:
        rules = [r for g in server.api("rules")["groups"]
                 for r in g["rules"]]
        assert not [r for r in rules if r["health"] == "err"], rules
        if server.query('count_over_time(up{job="kvmexit"}[1m]) >= 3') \
                and all(r["health"] == "ok" for r in rules):
            return rules
        assert time.monotonic() < deadline, rules
        time.sleep(0.5)


def test_every_query_and_rule_runs_on_a_real_prometheus(prometheus,
                                                        exporter):
    rules = wait_for_rules(prometheus)
    assert sorted(r["name"] for r in rules) == sorted(
        r.get("record") or r.get("alert") for r in rules_of(RULES))
    # A healthy, idle host: up, nothing lost, no alert.
    assert prometheus.query('up{job="kvmexit"}')[0][1] == 1
    assert {r["name"]: r["state"] for r in rules if r["type"] == "alerting"} \
        == {r["alert"]: "inactive" for r in rules_of(RULES) if "alert" in r}

    served = served_metrics(scrape(exporter)) | {"up"}
    records = recorded(RULES)
    alerts = {r["expr"].strip() for r in rules_of(RULES) if "alert" in r}
    queries = dashboard_queries(DASHBOARD) + rule_expressions(RULES)
    returned = {}
    for query in queries:
        returned[query] = bool(prometheus.query(query))
    for query in queries:
        if query in alerts:
            assert not returned[query], query
        else:
            assert returned[query] == (
                metrics_read(query, records) <= served), query
    # What this host shows: the exporter's own series, no exits.
    assert "kvmexit_lost_exits_total" in served
    assert "kvm_exits_total" not in served
    assert returned['sum by (instance, why) (rate(kvmexit_lost_exits_total'
                    '{instance=~".*"}[1m]))']
    assert not returned['sum by (instance, vm) (rate(kvm_exits_total'
                        '{instance=~".*", vm=~".*"}[1m]))']
