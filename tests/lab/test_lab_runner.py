"""The lab runner without booting a lab: what counts as frozen; a lab
frozen while booting is booted again once; the session's scenarios run in
one boot per lab, a frozen boot once more in new directories for the
scenarios left, a second freeze fails them; a scenario's failure is its
own; sequence.py's timeouts and statuses.  test_lab_frozen.py makes real
labs look frozen."""

import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import core  # noqa: E402
import fixtures  # noqa: E402
import sequence  # noqa: E402
from amd import AmdLab  # noqa: E402
from intel import IntelLab  # noqa: E402


def test_frozen_means_not_booted_in_time_or_no_heartbeat(tmp_path):
    lab, markers = AmdLab(), str(tmp_path)
    now = time.time()
    assert lab.frozen(markers, now) == ""       # booting
    assert lab.frozen(markers, now - lab.boot_limit - 1) == \
        f"not booted after {lab.boot_limit} s"
    core.write_marker(markers, "ready", {"uptime": 1})
    launched = now - lab.boot_limit - 1         # a slow boot, but booted
    assert lab.frozen(markers, launched) == ""
    old = os.path.getmtime(os.path.join(markers, "ready")) - \
        lab.frozen_after - 1
    os.utime(os.path.join(markers, "ready"), (old, old))
    no_beat = f"no heartbeat for {lab.frozen_after} s while running the " \
        "command"
    assert lab.frozen(markers, launched) == no_beat     # ready long ago
    core.write_marker(markers, "heartbeat", {})
    assert lab.frozen(markers, launched) == ""          # a fresh beat
    os.utime(os.path.join(markers, "heartbeat"), (old, old))
    assert lab.frozen(markers, launched) == no_beat
    core.write_marker(markers, "status", {"status": 0})
    assert lab.frozen(markers, launched) == ""  # done: nothing to wait for


def test_failed_checks_are_not_a_freeze(tmp_path):
    lab = AmdLab()
    core.write_marker(str(tmp_path), "error", {"error": "no /dev/kvm"})
    assert lab.frozen(str(tmp_path), time.time() - lab.boot_limit - 1) == ""


def test_a_lab_whose_markers_come_back_only_at_the_end_never_looks_frozen(
        tmp_path):
    lab = IntelLab()
    assert lab.frozen(str(tmp_path), time.time() - lab.boot_limit - 1) == ""


class Boots(AmdLab):
    """An AMD lab whose boots raise each of `freezes` (booted or not) in
    turn, then return."""

    def __init__(self, *freezes):
        super().__init__()
        self.freezes, self.calls = list(freezes), 0

    def setup(self):
        return "/boot/vmlinuz-x"

    def boot_and_run(self, cmd, target, release, timeout, outdir, echo):
        self.calls += 1
        if self.freezes:
            raise core.LabFrozen("the lab froze", "", self.freezes.pop(0))
        return 0, "done"


def boots(tmp_path, *freezes):
    lab = Boots(*freezes)
    try:
        return lab.run("true", 60, str(tmp_path)), lab.calls
    except core.LabFrozen as e:
        return e, lab.calls


def test_a_lab_frozen_while_booting_is_booted_again_once(tmp_path, capsys):
    assert boots(tmp_path, False) == ((0, "done"), 2)
    assert capsys.readouterr().out == \
        "lab: the lab froze\nlab: booting it again, once\n"
    error, calls = boots(tmp_path, False, False)
    assert isinstance(error, core.LabFrozen) and calls == 2


def test_a_lab_frozen_while_running_the_command_is_not_booted_again(
        tmp_path):
    error, calls = boots(tmp_path, True)
    assert isinstance(error, core.LabFrozen) and error.booted and calls == 1


class Plans:
    """Stands for the labs of LabRuns: each boot runs the plan it is given
    (each scenario writes r.json holding its name and the boot's number;
    "bad" exits 3), freezing after `finish` scenarios on the boots listed
    in `freeze`."""

    def __init__(self, freeze=(), finish=1):
        self.freeze, self.finish = freeze, finish
        self.boots = []

    def __call__(self, kind):
        return self

    def run(self, cmd, timeout, outdir, quiet):
        with open(cmd[-1]) as f:
            plan = json.load(f)
        self.boots.append([s["name"] for s in plan])
        for i, s in enumerate(plan):
            if len(self.boots) in self.freeze and i == self.finish:
                raise core.LabFrozen("the lab froze", "console text")
            with open(os.path.join(s["outdir"], "r.json"), "w") as f:
                json.dump([s["name"], len(self.boots)], f)
            core.write_marker(s["outdir"], "status", {
                "status": 3 if s["name"] == "bad" else 0})
        return 0, ""


SCENARIOS = [fixtures.Scenario(name, script=f"{name}.py")
             for name in ("a", "b", "c", "bad")]


def runs_of(tmp_path, labs):
    return fixtures.LabRuns(SCENARIOS, base=str(tmp_path), lab_of=labs)


def test_the_scenarios_of_a_lab_share_one_boot(tmp_path):
    labs = Plans()
    runs = runs_of(tmp_path, labs)
    assert [runs.results(s, "r.json") for s in SCENARIOS[:3]] == \
        [["a", 1], ["b", 1], ["c", 1]]
    assert labs.boots == [["a", "b", "c", "bad"]]


def test_a_failed_scenario_fails_only_its_own_tests(tmp_path):
    runs = runs_of(tmp_path, Plans())
    with pytest.raises(AssertionError, match=r"bad failed \({'status': 3}\)"
                       " in the amd lab:"):
        runs.outdir(SCENARIOS[3])
    assert runs.results(SCENARIOS[0], "r.json") == ["a", 1]


def test_a_frozen_lab_runs_the_scenarios_left_again_in_new_directories(
        tmp_path, capsys):
    labs = Plans(freeze=(1,), finish=2)
    runs = runs_of(tmp_path, labs)
    assert [runs.results(s, "r.json") for s in SCENARIOS[:3]] == \
        [["a", 1], ["b", 1], ["c", 2]]
    assert labs.boots == [["a", "b", "c", "bad"], ["c", "bad"]]
    assert runs.outdir(SCENARIOS[2]) == str(tmp_path / "amd-2" / "c")
    assert "lab: the lab froze; booting it again, once\n" in \
        capsys.readouterr().out


def test_a_lab_that_freezes_twice_fails_the_scenarios_left(tmp_path):
    labs = Plans(freeze=(1, 2), finish=0)
    runs = runs_of(tmp_path, labs)
    with pytest.raises(AssertionError, match="the amd lab did not run a, b, "
                       "c, bad: the lab froze"):
        runs.outdir(SCENARIOS[0])
    assert len(labs.boots) == 2


def test_an_earlier_runs_directory_is_checked_without_booting(
        tmp_path, monkeypatch):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "r.json").write_text('"again"')
    monkeypatch.setenv("KVMEXIT_TEST_A", str(earlier))
    scenario = fixtures.Scenario("a", script="a.py", env="KVMEXIT_TEST_A")
    labs = Plans()
    runs = fixtures.LabRuns([scenario], base=str(tmp_path), lab_of=labs)
    assert runs.results(scenario, "r.json") == "again"
    assert labs.boots == []


def plan_of(tmp_path, *scenarios):
    return [{"name": name, "argv": ["/bin/sh", "-c", line],
             "outdir": str(tmp_path / name), "timeout": timeout}
            for name, line, timeout in scenarios]


def test_sequence_records_each_status_and_ends_one_that_overruns(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sequence, "TRIGGERS", str(tmp_path / "none"))
    plan = plan_of(tmp_path, ("ok", "echo hello", 60),
                   ("fails", "exit 7", 60),
                   ("hangs", "sleep 600 & sleep 600", 2))
    for scenario in plan:
        sequence.run_one(scenario)
    status = {s["name"]: core.read_marker(s["outdir"], "status")["status"]
              for s in plan}
    assert status == {"ok": 0, "fails": 7, "hangs": 124}
    assert (tmp_path / "ok" / "output").read_text() == "hello\n"
    assert (tmp_path / "hangs" / "output").read_text() == \
        "\nlab: hangs ran out of its 2 s\n"
    out = capsys.readouterr().out
    assert "lab: scenario hangs: status 124 in 2 s\n" in out


def test_sequence_does_not_run_a_scenario_again(tmp_path, monkeypatch):
    monkeypatch.setattr(sequence, "TRIGGERS", str(tmp_path / "none"))
    ran = tmp_path / "ran"
    plan = plan_of(tmp_path, ("once", f"echo ran >> {ran}", 60))
    sequence.run_one(plan[0])
    sequence.run_one(plan[0])
    assert ran.read_text() == "ran\n"
