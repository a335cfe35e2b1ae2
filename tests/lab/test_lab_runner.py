"""The lab runner without booting a lab: what counts as frozen; a lab
frozen while booting is booted again once; the session's scenarios run in
one boot per lab, a frozen boot once more in new directories for the
scenarios left, a second freeze fails them; a scenario's failure is its
own; all labs start in the background, one that can wait niced; the
session's summary counts boots, retries and freezes; sequence.py's
timeouts and statuses.  test_lab_frozen.py makes real labs look
frozen."""

import collections
import json
import os
import sys
import threading
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


def test_a_lab_counts_its_boots_retries_freezes_and_timeouts(tmp_path):
    lab = Boots()
    assert lab.run("true", 60, str(tmp_path)) == (0, "done")
    assert lab.tally == {}              # Boots stands in for the boot
    lab = Boots(False, False)
    with pytest.raises(core.LabFrozen):
        lab.run("true", 60, str(tmp_path))
    assert lab.tally == {"retried": 1}
    run = core.Run(str(tmp_path), str(tmp_path), time.time())
    for how in ("frozen", "timeout"):
        with pytest.raises(core.LabError):
            lab.conclude(how, run, 60, 1.0, None)
    assert lab.tally == {"retried": 1, "frozen": 1, "timed out": 1}


class Plans:
    """Stands for the labs of LabRuns: each boot runs the plan it is given
    (each scenario writes r.json holding its name and the boot's number;
    "bad" exits 3), freezing after `finish` scenarios on the boots listed
    in `freeze`."""

    def __init__(self, freeze=(), finish=1):
        self.freeze, self.finish = freeze, finish
        self.boots = []
        self.tally = collections.Counter()

    def __call__(self, kind):
        return self

    def run(self, cmd, timeout, outdir, quiet):
        with open(cmd[-1]) as f:
            plan = json.load(f)
        self.boots.append([s["name"] for s in plan])
        self.tally["boots"] += 1
        for i, s in enumerate(plan):
            if len(self.boots) in self.freeze and i == self.finish:
                self.tally["frozen"] += 1
                raise core.LabFrozen("the lab froze", "console text")
            with open(os.path.join(s["outdir"], "r.json"), "w") as f:
                json.dump([s["name"], len(self.boots)], f)
            core.write_marker(s["outdir"], "status", {
                "status": 3 if s["name"] == "bad" else 0, "seconds": 0.2})
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
    with pytest.raises(AssertionError, match=r"bad failed \({'status': 3, "
                       r"'seconds': 0.2}\) in the amd lab:"):
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
    assert runs.summary()[-1] == \
        "lab boots 2, retried 1, frozen 2, timed out 0"


def test_the_summary_has_each_labs_time_and_its_scenarios(tmp_path):
    labs = Plans(freeze=(1,), finish=2)
    runs = runs_of(tmp_path, labs)
    runs.outdir(SCENARIOS[0])
    start, seconds = runs.times["amd"]
    assert 0 <= start and 0 <= seconds < 10
    assert runs.summary() == [
        f"lab amd: {seconds:.0f} s, from {start:.0f} s into the session: "
        "a 0 s, b 0 s, c 0 s, bad 0 s",
        "lab boots 2, retried 1, frozen 1, timed out 0"]


def test_a_session_without_labs_has_no_summary():
    assert fixtures.LabRuns([]).summary() == []


class Niceness(Plans):
    """Plans that also note the nice value of the thread that boots each
    lab, relative to this test's; as the real ones, the Intel lab's
    markers come back only at the end."""

    def __init__(self):
        super().__init__()
        self.nice = {}
        self.base = os.getpriority(os.PRIO_PROCESS, 0)

    def __call__(self, kind):
        self.kind = kind
        return self

    @property
    def live_markers(self):
        return self.kind != "intel"

    def run(self, cmd, timeout, outdir, quiet):
        with open(cmd[-1]) as f:
            name = json.load(f)[0]["name"]
        self.nice[name] = os.getpriority(
            os.PRIO_PROCESS, threading.get_native_id()) - self.base
        return super().run(cmd, timeout, outdir, quiet)


def test_all_labs_start_in_the_background_one_that_can_wait_niced(
        tmp_path):
    scenarios = [fixtures.Scenario(name, script="x.py", lab=kind)
                 for name, kind in (("i", "intel"), ("a", "amd"),
                                    ("r", "arm64"), ("b", "amd2"))]
    labs = Niceness()
    runs = fixtures.LabRuns(scenarios, base=str(tmp_path), lab_of=labs)
    assert runs.kinds() == ["amd", "amd2", "arm64", "intel"]
    runs.start_all()
    assert set(runs.threads) == {"amd", "amd2", "arm64", "intel"}
    assert [runs.results(s, "r.json")[0] for s in scenarios] == \
        ["i", "a", "r", "b"]
    # A starved AMD or arm64 lab would look frozen; the Intel lab can wait.
    assert labs.nice == {"a": 0, "b": 0, "r": 0, "i": fixtures.YIELD}
    assert os.getpriority(os.PRIO_PROCESS, 0) == labs.base


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
