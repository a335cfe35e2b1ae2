"""Signals and readiness: a stopped and continued kvmexit goes on (Ctrl-Z,
kill -STOP, a debugger), and --prometheus tells systemd READY=1 once
/metrics answers and STOPPING=1 when told to stop, through a real unix
datagram socket given as $NOTIFY_SOCKET, as systemd does (Type=notify).

Runs as root on the real kernel, never skipped (see conftest.py)."""

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

import kvmexit
from helpers import SCRIPT, SYSTEM_PYTHON, HEADER_ALL


def start(args, **kw):
    return subprocess.Popen([SYSTEM_PYTHON, SCRIPT] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


@contextlib.contextmanager
def running(args, **kw):
    """kvmexit started with `args`, killed if the test ends before it."""
    tool = start(args, **kw)
    try:
        yield tool
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()


def pause(tool, seconds, stop=signal.SIGSTOP):
    """Stop the tool (`stop`), then continue it `seconds` later."""
    tool.send_signal(stop)
    time.sleep(seconds)
    tool.send_signal(signal.SIGCONT)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port,
                                timeout=5) as r:
        return r.status


@pytest.mark.parametrize("stop", [signal.SIGSTOP, signal.SIGTSTP],
                         ids=["SIGSTOP", "Ctrl-Z"])
def test_stop_and_continue_do_not_end_interval_reports(bcc, stop):
    with running(["-i", 1, "-c", 4]) as tool:
        first = tool.stdout.readline()
        assert first.startswith("Display kvm exit reasons")
        assert tool.stdout.readline() == "\n"
        assert tool.stdout.readline() == HEADER_ALL + "\n"
        time.sleep(0.3)         # into the wait for the next report
        pause(tool, 1.5, stop)
        out, err = tool.communicate(timeout=30)
    assert (tool.returncode, err) == (0, "")
    assert out == ("\n" + HEADER_ALL + "\n") * 3


def test_stop_and_continue_do_not_end_a_duration(bcc):
    with running([3]) as tool:
        assert tool.stdout.readline().startswith("Display kvm exit reasons")
        started = time.monotonic()
        time.sleep(0.3)         # into the wait
        pause(tool, 3)          # past the end of the duration
        out, err = tool.communicate(timeout=30)
    assert time.monotonic() - started > 3
    assert (tool.returncode, out, err) == (0, HEADER_ALL + "\n", "")


class NotifySocket:
    """A unix datagram socket bound where $NOTIFY_SOCKET points."""

    def __init__(self, address, env_value):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.env = env_value

    def receive(self, timeout):
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def close(self):
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    if request.param == "path":
        path = str(tmp_path / "notify")
        s = NotifySocket(path, path)
    else:
        name = "kvmexit-test-%d" % os.getpid()
        s = NotifySocket("\0" + name, "@" + name)
    yield s
    s.close()


def test_sd_notify_sends_one_datagram(notify_socket):
    assert kvmexit.sd_notify("READY=1", {"NOTIFY_SOCKET": notify_socket.env})
    assert notify_socket.receive(1) == "READY=1"


def test_sd_notify_without_notify_socket_does_nothing():
    assert kvmexit.sd_notify("READY=1", {}) is False


def test_sd_notify_to_a_socket_nobody_listens_on_warns(tmp_path, capsys):
    gone = str(tmp_path / "gone")
    assert kvmexit.sd_notify("READY=1", {"NOTIFY_SOCKET": gone}) is False
    assert capsys.readouterr().err == "kvmexit: warning: cannot tell " \
        "systemd READY=1 through NOTIFY_SOCKET: No such file or directory\n"


def test_the_service_is_ready_once_metrics_answers_and_says_stopping(
        bcc, notify_socket):
    port = free_port()
    env = dict(os.environ, NOTIFY_SOCKET=notify_socket.env)
    with running(["--prometheus", "127.0.0.1:%d" % port], env=env) as tool:
        assert notify_socket.receive(120) == "READY=1"
        assert get(port) == 200         # at once: no retry needed
        pause(tool, 0.5)
        time.sleep(1.5)                 # a TICK after the stop
        assert tool.poll() is None
        assert get(port) == 200
        tool.send_signal(signal.SIGTERM)
        assert notify_socket.receive(30) == "STOPPING=1"
        out, err = tool.communicate(timeout=30)
    assert (tool.returncode, err) == (0, "")
