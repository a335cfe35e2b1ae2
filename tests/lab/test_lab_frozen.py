"""Real labs made to look frozen, with the limits shortened: the lab is
stopped, and its failure says where its CPUs were and ends with what its
kernel logged, the backtraces asked for through QEMU's monitor included.
A lab that does not boot in time is booted again once, then fails."""

import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from amd import AmdLab  # noqa: E402
from core import LabFrozen  # noqa: E402


class QuickToFreeze(AmdLab):
    frozen_after = 15


class NeverReady(AmdLab):
    """A lab whose first process never reports ready: it cannot boot in
    time, however fast the machine boots."""

    boot_limit = 20

    def init_command(self, run, release, command):
        return "sleep 600"


def test_no_heartbeat_stops_the_lab_with_its_backtraces(tmp_path):
    # Stopping the init stops its heartbeat; the kernel runs on.
    with pytest.raises(LabFrozen) as frozen:
        QuickToFreeze().run("kill -STOP $PPID; sleep 600", timeout=600,
                            outdir=str(tmp_path), quiet=True)
    message = str(frozen.value)
    assert frozen.value.booted
    assert message.startswith("the lab froze: no heartbeat for 15 s while "
                              "running the command; its CPUs at RIP=")
    where = message.split("\n")[0].split("its CPUs at ")[1]
    assert len(where.split(", ")) == 2                  # the lab's 2 CPUs
    assert "\nits kernel log ends:\n" in message
    log = message.split("\nits kernel log ends:\n")[1]
    assert "sysrq: Show backtrace of all active CPUs" in log
    assert "sysrq: Show Blocked State" in log
    assert "NMI backtrace for cpu" in log


def test_a_lab_not_booted_in_time_is_booted_again_once(capsys, tmp_path):
    with pytest.raises(LabFrozen) as frozen:
        NeverReady().run("echo never", timeout=600, outdir=str(tmp_path),
                         quiet=True)
    assert not frozen.value.booted
    assert str(frozen.value).startswith(
        "the lab froze: not booted after 20 s; its CPUs at RIP=")
    # The kernel did boot: only the init never said it was ready.
    log = str(frozen.value).split("\nits kernel log ends:\n")[1]
    assert len(re.findall(r"^\[ *\d+\.\d{6}\] ", log, re.M)) >= 100
    first = capsys.readouterr().out
    assert first.startswith("lab: the lab froze: not booted after 20 s")
    assert first.endswith("\nlab: booting it again, once\n")
    assert first.count("lab: the lab froze: not booted after 20 s") == 1
    assert "never" not in frozen.value.output
