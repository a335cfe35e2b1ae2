"""The lab runner's handling of a frozen lab, without booting one: a
scenario is run again, once, in a new directory; a second freeze fails."""

import json
import os
import sys

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


def test_frozen_means_no_heartbeat_while_the_command_runs(tmp_path):
    markers = str(tmp_path)
    assert not lab.frozen(markers)              # booting: the timeout's
    lab.write_marker(markers, "ready", {"uptime": 1})
    assert not lab.frozen(markers)
    old = os.path.getmtime(os.path.join(markers, "ready")) - \
        lab.FROZEN_AFTER - 1
    os.utime(os.path.join(markers, "ready"), (old, old))
    assert lab.frozen(markers)                  # ready long ago, no beat
    lab.write_marker(markers, "heartbeat", {})
    assert not lab.frozen(markers)              # a fresh beat
    os.utime(os.path.join(markers, "heartbeat"), (old, old))
    assert lab.frozen(markers)
    lab.write_marker(markers, "status", {"status": 0})
    assert not lab.frozen(markers)              # done: nothing to wait for
