"""The lab runner's handling of a frozen lab, without booting one: what
counts as frozen; a lab frozen while booting is booted again once; a
scenario whose lab froze is run again, once, in a new directory; a second
freeze fails.  test_lab_frozen.py makes real labs look frozen."""

import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lab  # noqa: E402


class Runs:
    """Stands for run_in_lab: freezes `freezes` times, then writes the
    scenario's results into the directory it was given."""

    def __init__(self, freezes):
        self.freezes, self.outdirs = freezes, []

    def __call__(self, cmd, timeout, outdir):
        self.outdirs.append(outdir)
        assert cmd[-1] == outdir
        if len(self.outdirs) <= self.freezes:
            raise lab.LabFrozen("the lab froze", "console text")
        with open(os.path.join(outdir, "x.json"), "w") as f:
            json.dump({"run": len(self.outdirs)}, f)
        return 0, ""


def test_a_frozen_lab_is_booted_again_once_in_a_new_directory(
        tmp_path_factory, monkeypatch):
    monkeypatch.delenv("KVMEXIT_TEST_X", raising=False)
    runs = Runs(freezes=1)
    assert lab.scenario_results(tmp_path_factory, "s.py", "x.json",
                                "KVMEXIT_TEST_X", run=runs) == {"run": 2}
    assert len(runs.outdirs) == 2 and runs.outdirs[0] != runs.outdirs[1]


def test_a_lab_that_freezes_twice_fails(tmp_path_factory, monkeypatch):
    monkeypatch.delenv("KVMEXIT_TEST_X", raising=False)
    runs = Runs(freezes=2)
    with pytest.raises(AssertionError, match="the lab froze"):
        lab.scenario_results(tmp_path_factory, "s.py", "x.json",
                             "KVMEXIT_TEST_X", run=runs)
    assert len(runs.outdirs) == 2


def test_frozen_means_not_booted_in_time_or_no_heartbeat(tmp_path):
    markers = str(tmp_path)
    now = time.time()
    assert lab.frozen(markers, now) == ""       # booting
    assert lab.frozen(markers, now - lab.BOOT_LIMIT - 1) == \
        f"not booted after {lab.BOOT_LIMIT} s"
    lab.write_marker(markers, "ready", {"uptime": 1})
    launched = now - lab.BOOT_LIMIT - 1         # a slow boot, but booted
    assert lab.frozen(markers, launched) == ""
    old = os.path.getmtime(os.path.join(markers, "ready")) - \
        lab.FROZEN_AFTER - 1
    os.utime(os.path.join(markers, "ready"), (old, old))
    no_beat = f"no heartbeat for {lab.FROZEN_AFTER} s while running the " \
        "command"
    assert lab.frozen(markers, launched) == no_beat     # ready long ago
    lab.write_marker(markers, "heartbeat", {})
    assert lab.frozen(markers, launched) == ""          # a fresh beat
    os.utime(os.path.join(markers, "heartbeat"), (old, old))
    assert lab.frozen(markers, launched) == no_beat
    lab.write_marker(markers, "status", {"status": 0})
    assert lab.frozen(markers, launched) == ""  # done: nothing to wait for


def test_failed_checks_are_not_a_freeze(tmp_path):
    markers = str(tmp_path)
    lab.write_marker(markers, "error", {"error": "no /dev/kvm"})
    assert lab.frozen(markers, time.time() - lab.BOOT_LIMIT - 1) == ""


class Boots:
    """Stands for boot_and_run: raises each of `freezes` (booted or not)
    in turn, then returns."""

    def __init__(self, *freezes):
        self.freezes, self.calls = list(freezes), 0

    def __call__(self, cmd, kernel, timeout, outdir, cpus, echo):
        self.calls += 1
        if self.freezes:
            raise lab.LabFrozen("the lab froze", "", self.freezes.pop(0))
        return 0, "done"


@pytest.fixture
def boots(monkeypatch, tmp_path):
    monkeypatch.setattr(lab, "setup", lambda: "/boot/vmlinuz-x")

    def run(*freezes):
        fake = Boots(*freezes)
        monkeypatch.setattr(lab, "boot_and_run", fake)
        try:
            return lab.run_in_lab("true", 60, str(tmp_path)), fake.calls
        except lab.LabFrozen as e:
            return e, fake.calls
    return run


def test_a_lab_frozen_while_booting_is_booted_again_once(boots, capsys):
    assert boots(False) == ((0, "done"), 2)
    assert capsys.readouterr().out == \
        "lab: the lab froze\nlab: booting it again, once\n"
    error, calls = boots(False, False)
    assert isinstance(error, lab.LabFrozen) and calls == 2


def test_a_lab_frozen_while_running_the_command_is_not_booted_again(boots):
    error, calls = boots(True)
    assert isinstance(error, lab.LabFrozen) and error.booted and calls == 1
