"""The edges of input and output (issue 10): output streams that close or
fill, /proc text that is not UTF-8, numbers out of bounds, TID lists of
any length, a broken bcc or missing headers, options of bcc's kvmexit.

Every case ends with one 'kvmexit: ...' line (or argparse's usage error),
a non-zero status and no traceback -- or, where nothing is wrong for the
tool, a normal run."""

import json
import os
import signal
import subprocess
import textwrap
import time

import pytest

import kvmexit
from helpers import (
    program,
    HEADER_ALL, HEADER_COLLAPSED, SCRIPT, SYSTEM_PYTHON,
    assert_one_error_line, first_line, run_tool)

PID = os.getpid()


@pytest.fixture(scope="module")
def ready(bcc):
    return bcc


def no_traceback(result):
    assert "Traceback" not in result.stderr, result.stderr


#
# Output streams
#
def run_piped_to_a_reader_that_leaves(args, keep_lines):
    """kvmexit ARGS | head -KEEP_LINES: the reader closes the pipe after
    reading that many lines."""
    proc = subprocess.Popen([SYSTEM_PYTHON, SCRIPT] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = [proc.stdout.readline() for _ in range(keep_lines)]
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    return got, err, proc.returncode


def test_pipe_closed_by_the_reader_before_the_report(ready):
    got, err, rc = run_piped_to_a_reader_that_leaves([1], 1)
    assert got == [(first_line("all threads", 1) + "\n").encode()]
    assert "Traceback" not in err
    assert err.splitlines() == [
        "kvmexit: cannot write the report to stdout: Broken pipe"]
    assert rc == 1


def test_pipe_closed_between_interval_reports(ready):
    # The first report is read whole (empty line, header), then the reader
    # goes: the second report cannot be written.
    got, err, rc = run_piped_to_a_reader_that_leaves(["-i", 1, "-c", 5], 3)
    first = first_line("all threads").replace("... Hit Ctrl-C to end.",
                                              " every 1 secs, 5 times.")
    assert got == [(first + "\n").encode(), b"\n",
                   (HEADER_ALL + "\n").encode()]
    assert err.splitlines() == [
        "kvmexit: cannot write the report to stdout: Broken pipe"]
    assert rc == 1


def test_json_to_a_closed_pipe(ready):
    got, err, rc = run_piped_to_a_reader_that_leaves(["--json", 1], 0)
    assert err.splitlines() == [
        first_line("all threads", 1),
        "kvmexit: cannot write the report to stdout: Broken pipe"]
    assert rc == 1


def test_stdout_on_a_full_device(ready):
    with open("/dev/full", "w") as full:
        result = subprocess.run([SYSTEM_PYTHON, SCRIPT, "1"], stdout=full,
                                stderr=subprocess.PIPE, text=True,
                                timeout=60)
    no_traceback(result)
    assert result.stderr.splitlines() == [
        "kvmexit: cannot write the report to stdout: No space left on "
        "device"]
    assert result.returncode == 1


def run_with_closed(fds, args):
    """Run kvmexit with some of its standard streams closed."""
    closing = " ".join("%d>&-" % fd if fd else "<&-" for fd in fds)
    cmd = "exec %s %s %s %s" % (SYSTEM_PYTHON, SCRIPT,
                               " ".join(str(a) for a in args), closing)
    return subprocess.run(["/bin/sh", "-c", cmd], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=60)


def test_stdout_closed(ready):
    result = run_with_closed([1], [1])
    assert_one_error_line(result, "kvmexit: standard output is closed: "
                          "nothing to report to")


def test_stderr_closed_still_reports(ready):
    result = run_with_closed([2], [1])
    assert (result.stdout, result.stderr, result.returncode) == (
        first_line("all threads", 1) + "\n" + HEADER_ALL + "\n", "", 0)


def test_stderr_closed_and_an_error_gives_only_the_status(ready):
    result = run_with_closed([2], ["-p", 2 ** 22 + 1])
    assert (result.stdout, result.stderr, result.returncode) == ("", "", 1)


def test_stdin_closed_changes_nothing(ready):
    result = run_with_closed([0], [1])
    assert (result.stdout, result.stderr, result.returncode) == (
        first_line("all threads", 1) + "\n" + HEADER_ALL + "\n", "", 0)


def test_stderr_closed_with_debug_output_does_not_reach_a_map_fd(ready):
    # With fd 2 closed, the first file kvmexit opens would get number 2
    # and receive clang's and bcc's messages; it gets /dev/null instead.
    result = run_with_closed([2], ["-d", 1])
    assert (result.stdout, result.returncode) == (
        first_line("all threads", 1) + "\n" + HEADER_ALL + "\n", 0)


#
# /proc text that is not UTF-8
#
def test_process_name_with_bytes_that_are_not_utf8(fake_proc):
    fake_proc.process(70, {71: "CPU 0/KVM"})
    root = fake_proc.path
    # A name cut in the middle of a two-byte character, and a command
    # line with a stray byte in QEMU's -name.
    with open("%s/70/comm" % root, "wb") as f:
        f.write(b"qemu-caf\xc3\n")
    with open("%s/70/cmdline" % root, "wb") as f:
        f.write(b"qemu\0-name\0guest=vm\xff1,debug-threads=on\0")
    assert kvmexit.process_name(70, root) == \
        "qemu-caf\\xc3 guest=vm\\xff1"


def test_process_name_with_control_characters(fake_proc):
    fake_proc.process(80, {81: "CPU 0/KVM"})
    with open("%s/80/comm" % fake_proc.path, "wb") as f:
        f.write(b"evil\nname\t\n")
    with open("%s/80/cmdline" % fake_proc.path, "wb") as f:
        f.write(b"evil\0")
    assert kvmexit.process_name(80, fake_proc.path) == "evil\\x0aname\\x09"


def test_thread_names_that_are_not_utf8(fake_proc):
    fake_proc.process(90, {91: "CPU 0/KVM", 92: "x"})
    with open("%s/90/task/92/comm" % fake_proc.path, "wb") as f:
        f.write(b"\xffCPU 1/KVM\n")
    names = kvmexit.thread_names(90, fake_proc.path)
    assert names[92] == "\\xffCPU 1/KVM\n"
    assert kvmexit.vcpu_thread(90, 0, fake_proc.path) == 91
    assert kvmexit.vcpu_thread(90, 1, fake_proc.path) is None


VMM_WITH_BAD_NAMES = textwrap.dedent(r"""
    import fcntl, os, sys, time
    # A VMM: a VM and a vCPU through the real /dev/kvm.
    kvm = os.open("/dev/kvm", os.O_RDWR)
    vm = fcntl.ioctl(kvm, 0xAE01, 0)
    vcpu = fcntl.ioctl(vm, 0xAE41, 0)
    with open("/proc/self/comm", "wb") as f:
        f.write(b"vmm\xe2\x82")         # cut inside a 3-byte character
    print("ready", flush=True)
    time.sleep(60)
""")


@pytest.fixture
def vmm_with_bad_names():
    # argv with a stray byte, as QEMU's -name.
    proc = subprocess.Popen([SYSTEM_PYTHON.encode(), b"-c",
                             VMM_WITH_BAD_NAMES.encode(), b"-name",
                             b"guest=bad\xffname"], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("fmt", ["--json", "--csv"])
def test_machine_output_names_a_vmm_whose_names_are_not_utf8(
        ready, vmm_with_bad_names, fmt):
    # --json and --csv name every VMM at start.
    result = run_tool([fmt, 1])
    no_traceback(result)
    assert result.returncode == 0
    assert result.stderr == first_line("all threads", 1) + "\n"
    if fmt == "--json":
        assert json.loads(result.stdout)["rows"] == []


def test_comm_first_line_of_a_vmm_whose_names_are_not_utf8(
        ready, vmm_with_bad_names):
    pid = vmm_with_bad_names
    result = run_tool(["--comm", "-p", pid, 1])
    no_traceback(result)
    assert result.stdout == (
        "Display kvm exit reasons and statistics for PID %d "
        "(vmm\\xe2\\x82 guest=bad\\xffname) after sleeping 1 secs.\n%s\n"
        % (pid, HEADER_COLLAPSED))
    assert result.returncode == 0


#
# Numbers without bounds
#
@pytest.mark.parametrize("args,message", [
    (["10000000000"], "argument duration: must be at most 1000000000: "
                      "'10000000000'"),
    (["-i", "10000000000"], "argument -i/--interval: must be at most "
                            "1000000000: '10000000000'"),
    (["--max-threads", "4294967297"], "argument --max-threads: must be at "
                                      "most 4294967295: '4294967297'"),
    (["-p", "4294967296"], "argument -p/--pid: must be at most 4294967295: "
                           "'4294967296'"),
    (["-T", "1,4294967296"], "argument -T/--tids: must be comma-separated "
                             "positive integers: '1,4294967296'"),
    (["-T", "1,\u00b2"], "argument -T/--tids: must be comma-separated "
                         "positive integers: '1,\u00b2'"),
    (["-m", "0"], "argument -m/--max-parallelism: must be a positive "
                  "integer: '0'"),
])
def test_numbers_out_of_bounds_are_usage_errors(args, message):
    result = run_tool(args)
    no_traceback(result)
    assert result.stderr.splitlines()[-1] == "kvmexit: error: " + message
    assert result.returncode == 2


def test_oversized_thread_table_is_refused_before_any_map(ready):
    # 5e7 threads x 2 CPUs x 1544 B: far more than this machine has.  The
    # check comes before the program is compiled: no map is ever created.
    before = set(os.listdir("/sys/fs/bpf")) if os.path.isdir(
        "/sys/fs/bpf") else set()
    started = time.monotonic()
    result = run_tool(["--max-threads", "50000000", 1])
    assert time.monotonic() - started < 5       # no compile happened
    # With the kernel's VM names where BTF allows them, as the tool does.
    need = program(50000000, kvmexit.slot_layout(),
                   {"names"} if kvmexit.task_offsets() else ()).memory(
        kvmexit.possible_cpus())
    line, = result.stderr.splitlines()
    assert line.startswith(
        "kvmexit: the counter tables would take %s of kernel memory "
        "(50000000 threads x %d possible CPUs x 1544 B), more than half of "
        "the " % (kvmexit.gib(need), kvmexit.possible_cpus()))
    assert line.endswith(" available now; lower --max-threads")
    assert (result.stdout, result.returncode) == ("", 1)
    if before:
        assert set(os.listdir("/sys/fs/bpf")) == before


def test_table_memory_check_against_a_chosen_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000000 kB\n"
                       "MemAvailable:    100000 kB\n")
    layout = kvmexit.SVM_LAYOUT
    # 102,400,000 B available: half is 51,200,000 B.
    fits = program(16000, layout).memory(2)
    assert fits <= 51200000
    kvmexit.check_table_memory(program(16000, layout), 2,
                               meminfo=str(meminfo))
    assert program(17000, layout).memory(2) > 51200000
    with pytest.raises(kvmexit.Error) as exc:
        kvmexit.check_table_memory(program(17000, layout), 2,
                                   meminfo=str(meminfo))
    # 17000 x (2 x 1544 + 64) + 1024 x (2 x 8 + 80) = 53,682,304 B.
    assert program(17000, layout).memory(2) == 53682304
    assert str(exc.value) == (
        "the counter tables would take 51.2 MiB of kernel memory (17000 "
        "threads x 2 possible CPUs x 1544 B), more than half of the 97.7 "
        "MiB available now; lower --max-threads")


def test_table_memory_follows_the_per_cpu_formula():
    # 1544 B of counters per thread and CPU (SVM), plus the element.
    layout = kvmexit.SVM_LAYOUT
    assert program(1, layout).memory(640) - \
        program(0, layout).memory(640) == 1544 * 640 + 64


def test_long_duration_within_bounds_runs_until_sigint(ready):
    proc = subprocess.Popen([SYSTEM_PYTHON, SCRIPT, "1000000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == first_line("all threads",
                                                1000000000) + "\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (out, err, proc.returncode) == ("\n" + HEADER_ALL + "\n", "", 0)


#
# bcc's own options
#
def test_max_parallelism_is_accepted_and_changes_nothing(ready):
    plain = run_tool([1])
    with_m = run_tool(["-m", 8, 1])
    assert (with_m.stdout, with_m.stderr, with_m.returncode) == (
        plain.stdout, plain.stderr, 0)


def test_max_parallelism_says_it_has_no_effect():
    result = run_tool(["-h"])
    text = " ".join(result.stdout.split())
    assert "-m N, --max-parallelism N accepted for scripts written for " \
        "bcc's kvmexit; no effect: the report is read in one pass" in text


#
# A broken environment
#
def test_bcc_whose_library_cannot_load(tmp_path):
    # A bcc module whose import fails as it does without libbcc.so.0.
    fake = tmp_path / "bcc"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise OSError('libbcc.so.0: cannot open shared object file: "
        "No such file or directory')\n")
    result = run_tool([1], env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert_one_error_line(result, "kvmexit: bcc cannot load: libbcc.so.0: "
                          "cannot open shared object file: No such file or "
                          "directory: reinstall libbpfcc (python3-bpfcc)")


def test_headers_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    with pytest.raises(kvmexit.Error) as exc:
        kvmexit.check_kernel_headers("9.9.9-test", str(tmp_path))
    assert str(exc.value) == (
        "no kernel headers for 9.9.9-test: install linux-headers-9.9.9-test,"
        " or link a matching headers tree to %s/9.9.9-test/build "
        "(.ci/install does that with Debian's linux-headers-amd64)"
        % tmp_path)


def test_headers_dangling_link(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    (tmp_path / "9.9.9-test").mkdir()
    os.symlink("/usr/src/linux-headers-gone", tmp_path / "9.9.9-test/build")
    with pytest.raises(kvmexit.Error) as exc:
        kvmexit.check_kernel_headers("9.9.9-test", str(tmp_path))
    assert str(exc.value) == (
        "no kernel headers for 9.9.9-test: %s/9.9.9-test/build is a dangling"
        " link to /usr/src/linux-headers-gone; reinstall its headers package"
        % tmp_path)


def test_headers_check_writes_nothing(tmp_path, monkeypatch):
    # /lib/modules may be read-only: kvmexit only looks.
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    os.chmod(tmp_path, 0o555)
    try:
        with pytest.raises(kvmexit.Error):
            kvmexit.check_kernel_headers("9.9.9-test", str(tmp_path))
        assert os.listdir(tmp_path) == []
    finally:
        os.chmod(tmp_path, 0o755)


def test_running_kernel_headers_are_in_place():
    # What .ci/install set up; kvmexit finds them without writing.
    kvmexit.check_kernel_headers()
    assert os.path.isdir("/lib/modules/%s/build/include" % os.uname().release)


#
# TID lists of any length
#
MANY_THREADS = textwrap.dedent(r"""
    import sys, threading
    threading.stack_size(64 * 1024)
    stop = threading.Event()
    tids, lock = [], threading.Lock()
    def body():
        with lock:
            tids.append(threading.get_native_id())
        stop.wait()
    workers = [threading.Thread(target=body, daemon=True)
               for _ in range(int(sys.argv[1]))]
    for w in workers:
        w.start()
    while len(tids) < len(workers):
        pass
    print(",".join(map(str, tids)), flush=True)
    sys.stdin.read()
""")


def test_tids_list_of_12500_threads(ready):
    # Clang crashed on a chain of 12,500 comparisons; the bitmap has no
    # limit.  Real threads, as kvmexit checks each TID against /proc.
    proc = subprocess.Popen([SYSTEM_PYTHON, "-c", MANY_THREADS, "12500"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        tids = proc.stdout.readline().strip()
        assert len(tids.split(",")) == 12500
        result = run_tool(["-T", tids, 1], timeout=120)
        no_traceback(result)
        assert result.stdout == "%s\n%s\n" % (
            first_line("TIDS %s" % tids.split(","), 1),
            "TIDS     KVM_EXIT_REASON                     COUNT")
        assert (result.stderr, result.returncode) == ("", 0)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_process_that_exits_while_its_threads_are_listed(fake_proc):
    fake_proc.process(60, {61: "CPU 0/KVM"})
    import shutil
    shutil.rmtree("%s/60/task" % fake_proc.path)
    assert kvmexit.thread_names(60, fake_proc.path) == {}
    assert kvmexit.vcpu_thread(60, 0, fake_proc.path) is None


def test_help_on_a_full_device():
    with open("/dev/full", "w") as full:
        result = subprocess.run([SYSTEM_PYTHON, SCRIPT, "-h"], stdout=full,
                                stderr=subprocess.PIPE, text=True,
                                timeout=60)
    assert result.stderr.splitlines() == [
        "kvmexit: No space left on device"]
    assert result.returncode == 1


#
# Issue 17's edges (F1, the stop/continue, is in test_signals.py; the
# web configuration's in test_web.py)
#
def start_serving(args, **kw):
    port = free_port()
    tool = subprocess.Popen([SYSTEM_PYTHON, SCRIPT, "--prometheus",
                             "127.0.0.1:%d" % port, "-d"] +
                            [str(a) for a in args], stderr=subprocess.PIPE,
                            text=True, **kw)
    line = tool.stderr.readline()
    while line.startswith("kvmexit: cflags") or \
            line.startswith("kvmexit: probe"):
        line = tool.stderr.readline()
    assert line == "kvmexit: listening on http://127.0.0.1:%d/metrics\n" \
        % port
    return tool, port


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(port, path="/metrics", timeout=10):
    import urllib.request
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path),
                                timeout=timeout) as r:
        return r.status, r.read().decode()


def stop_serving(tool):
    tool.send_signal(signal.SIGTERM)
    err = tool.stderr.read()
    assert tool.wait(timeout=30) == 0
    assert err == ""


@pytest.mark.parametrize("stdout", ["closed", "/dev/full"])
def test_f8_prometheus_runs_with_stdout_closed_or_full(ready, stdout):
    if stdout == "closed":
        tool, port = start_serving([], stdout=subprocess.DEVNULL,
                                   preexec_fn=lambda: os.close(1))
    else:
        with open(stdout, "w") as full:
            tool, port = start_serving([], stdout=full)
    try:
        status, text = metrics(port)
        assert status == 200 and "kvmexit_build_info{" in text
    finally:
        stop_serving(tool)


@pytest.mark.parametrize("args, lines", [
    (["--json", 1], 1),
    (["-d", 1], 2),
    (["--csv", "-i", 1, "-c", 2], 1),
])
def test_f7_a_full_stderr_does_not_lose_the_report(ready, args, lines):
    with open("/dev/full", "w") as full:
        argv = [SYSTEM_PYTHON, SCRIPT] + [str(a) for a in args]
        result = subprocess.run(argv,
                                stdout=subprocess.PIPE, stderr=full,
                                text=True, timeout=60)
    assert result.returncode == 0
    out = result.stdout.splitlines()
    assert len(out) == lines
    if "--json" in args:
        assert json.loads(out[0])["rows"] == []
    elif "--csv" in args:
        assert out == ["end,pid,tid,vcpu_id,comm,isa,exit_code,name,count"]
    else:
        assert out == [first_line("all threads", 1), HEADER_ALL]


def test_f3_no_file_size_allowed_works(ready):
    result = run_tool([1], prefix=["prlimit", "--fsize=0"])
    assert (result.stdout, result.stderr, result.returncode) == (
        first_line("all threads", 1) + "\n" + HEADER_ALL + "\n", "", 0)


def test_f3_read_only_temporary_directories_work(ready):
    # Read-only in place (not hidden under an empty mount): the checkout
    # itself may live under /tmp.
    script = "for d in /tmp /var/tmp; do mount --bind $d $d && " \
        "mount -o remount,bind,ro $d || exit 99; done; exec %s %s 1" % (
            SYSTEM_PYTHON, SCRIPT)
    result = subprocess.run(["unshare", "-m", "sh", "-c", script],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, TMPDIR="/tmp"))
    assert (result.stdout, result.stderr, result.returncode) == (
        first_line("all threads", 1) + "\n" + HEADER_ALL + "\n", "", 0)


def test_f3_capture_without_any_file_leaves_the_streams_alone(monkeypatch):
    def refused(*args, **kw):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", refused)
    monkeypatch.setattr(kvmexit.tempfile, "TemporaryFile", refused)
    before = os.fstat(2)
    with kvmexit.CapturedStderr() as err:
        assert os.fstat(2) == before
    assert (err.text, err.first_error()) == ("", "")


def truncated_btf(path):
    with open("/sys/kernel/btf/vmlinux", "rb") as f:
        path.write_bytes(f.read(100000))


@pytest.mark.parametrize("content", ["empty", "truncated", "bad header"])
def test_f4_a_broken_vmlinux_btf_falls_back_to_the_tracepoint(
        ready, tmp_path, content):
    fake = tmp_path / "vmlinux"
    if content == "truncated":
        truncated_btf(fake)
    elif content == "empty":
        fake.write_bytes(b"")
    else:
        fake.write_bytes(b"\x9e\xeb" + b"\0" * 200)
    # The unit: the same directory, given to choose_probe.
    probe = kvmexit.choose_probe("auto", kvmexit.tracepoint_dir(),
                                 btf_dir=str(tmp_path))
    assert (probe.kind, probe.why) == (
        "tracepoint", "fallback, kernel BTF has no kvm_exit prototype")
    # The command, with that file over the kernel's.
    script = "mount --bind %s /sys/kernel/btf/vmlinux && exec %s %s -d 1" \
        % (fake, SYSTEM_PYTHON, SCRIPT)
    result = subprocess.run(["unshare", "-m", "sh", "-c", script],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert [line for line in result.stderr.splitlines()
            if not line.startswith("kvmexit: cflags")] == [
        "kvmexit: probe: tracepoint (fallback, kernel BTF has no kvm_exit "
        "prototype)"]
    assert result.stdout == first_line("all threads", 1) + "\n" + \
        HEADER_ALL + "\n"


@pytest.mark.parametrize("content", ["abc\n", "", "0-99999999\n"])
def test_f4_a_cpu_list_that_is_not_one_is_one_line(ready, tmp_path,
                                                    content):
    # /sys/devices/system/cpu/possible as a broken kernel (or a container
    # runtime's mock) might show it: one line, and no list of 10**8 CPUs.
    fake = tmp_path / "possible"
    fake.write_text(content)
    script = "mount --bind %s %s && exec %s %s 1" % (
        fake, kvmexit.POSSIBLE_CPUS, SYSTEM_PYTHON, SCRIPT)
    result = subprocess.run(["unshare", "-m", "sh", "-c", script],
                            capture_output=True, text=True, timeout=60)
    assert_one_error_line(result, "kvmexit: %s: not a list of CPUs: %r" % (
        kvmexit.POSSIBLE_CPUS, content.strip()))


def copy_with_source(tmp_path, source):
    import shutil
    (tmp_path / "bpf").mkdir()
    shutil.copy(SCRIPT, tmp_path / "kvmexit.py")
    (tmp_path / "bpf" / "kvmexit.bpf.c").write_text(source)
    return str(tmp_path / "kvmexit.py")


@pytest.mark.parametrize("args", [[1], ["-t", PID, 1]])
def test_f5_an_empty_bpf_source_is_one_line(ready, tmp_path, args):
    script = copy_with_source(tmp_path, "")
    assert_one_error_line(run_tool(args, script=script),
                          "kvmexit: %s/bpf/kvmexit.bpf.c defines no BPF "
                          "program: reinstall kvmexit" % tmp_path)


def broken_module(tmp_path, name, error):
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("raise %s\n" % error)
    return dict(os.environ, PYTHONPATH=str(tmp_path))


def test_f6_a_bcc_raising_anything_is_one_line(tmp_path):
    env = broken_module(tmp_path, "bcc", "RuntimeError('half installed')")
    assert_one_error_line(run_tool([1], env=env),
                          "kvmexit: bcc or numpy failed to import: "
                          "RuntimeError: half installed: reinstall "
                          "python3-bpfcc and python3-numpy")


def test_f6_a_broken_prometheus_client_stops_only_prometheus(ready,
                                                             tmp_path):
    env = broken_module(tmp_path, "prometheus_client",
                        "ZeroDivisionError('division by zero')")
    result = run_tool([1], env=env)
    assert (result.stdout, result.stderr, result.returncode) == (
        first_line("all threads", 1) + "\n" + HEADER_ALL + "\n", "", 0)
    assert_one_error_line(run_tool(["--prometheus", 9417], env=env),
                          "kvmexit: prometheus_client failed to import: "
                          "ZeroDivisionError: division by zero: reinstall "
                          "python3-prometheus-client")


def test_f6_prometheus_client_is_imported_only_for_prometheus():
    code = "import sys; sys.path.insert(0, %r); import kvmexit; " \
        "print('prometheus_client' in sys.modules)" % os.path.dirname(SCRIPT)
    result = subprocess.run([SYSTEM_PYTHON, "-c", code], capture_output=True,
                            text=True, timeout=60)
    assert (result.stdout, result.stderr) == ("False\n", "")


def test_bcc_saying_it_has_no_headers_is_one_line_not_on_stdout(ready):
    result = run_tool([1], env=dict(os.environ,
                                    BCC_KERNEL_SOURCE="/nonexistent"))
    assert_one_error_line(result, "kvmexit: BPF compile failed: Unable to "
                          "find kernel headers. Try rebuilding kernel with "
                          "CONFIG_IKHEADERS=m (module) or installing the "
                          "kernel development package for your running "
                          "kernel version.")


def test_version():
    result = run_tool(["--version"])
    assert (result.stdout, result.stderr, result.returncode) == (
        "kvmexit %s\n" % kvmexit.VERSION, "", 0)


#
# The metrics server under load: idle clients, many at once, a cap
#
@pytest.fixture
def server(monkeypatch):
    """kvmexit's server on loopback with a collector that can be held."""
    import threading
    from prometheus_client.core import GaugeMetricFamily
    made = []

    class Held:
        def __init__(self):
            self.entered = threading.Semaphore(0)
            self.release = threading.Event()
            self.release.set()

        def describe(self):
            return []

        def collect(self):
            self.entered.release()
            self.release.wait(30)
            yield GaugeMetricFamily("held", "a test gauge", value=1)

    def make(client_timeout=None, **kw):
        if client_timeout:
            monkeypatch.setattr(kvmexit.MetricsServer, "CLIENT_TIMEOUT",
                                client_timeout)
        port = free_port()
        s = kvmexit.listen(("127.0.0.1", port), **kw)
        held = Held()
        s.registry.register(held)
        s.start()
        made.append(s)
        return port, held

    yield make
    for s in made:
        s.stop()


def test_f2_idle_clients_time_out_without_a_traceback(server, capfd):
    import socket
    port, _ = server(client_timeout=0.5)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    try:
        for s in idle:
            s.settimeout(5)
            assert s.recv(1) == b""     # closed by the server, in time
        assert metrics(port)[0] == 200
    finally:
        for s in idle:
            s.close()
    assert capfd.readouterr().err == ""


def test_f9_two_hundred_scrapes_at_once_are_all_answered(server):
    import socket
    from concurrent.futures import ThreadPoolExecutor
    port, _ = server()

    def scrape(_):
        # Connected within 0.9 s: before the client's first SYN
        # retransmission (1 s), so a connection the listen queue had no
        # room for fails here instead of being retried.
        with socket.create_connection(("127.0.0.1", port), timeout=0.9) as s:
            s.settimeout(20)
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            answer = b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        return answer.split(b" ", 2)[1]

    with ThreadPoolExecutor(200) as pool:
        codes = list(pool.map(scrape, range(200)))
    assert set(codes) <= {b"200", b"503"} and codes.count(b"200") >= 40


def test_f9_beyond_max_requests_is_503(server):
    import threading
    import urllib.error
    port, held = server(max_requests=1)
    held.release.clear()
    first = []
    t = threading.Thread(target=lambda: first.append(metrics(port)))
    t.start()
    assert held.entered.acquire(timeout=10)
    with pytest.raises(urllib.error.HTTPError) as exc:
        metrics(port)
    assert exc.value.code == 503
    assert exc.value.read() == b"More than 1 requests at once; try again " \
        b"later.\n"
    held.release.set()
    t.join(10)
    assert first[0][0] == 200 and "\nheld 1.0\n" in first[0][1]
    assert metrics(port)[0] == 200     # the slot is free again


def test_f9_max_requests_0_is_no_limit(server):
    import threading
    port, held = server(max_requests=0)
    held.release.clear()
    answers = []
    workers = [threading.Thread(target=lambda: answers.append(
        metrics(port)[0])) for _ in range(3)]
    for t in workers:
        t.start()
    for _ in workers:
        assert held.entered.acquire(timeout=10)    # all three at once
    held.release.set()
    for t in workers:
        t.join(10)
    assert answers == [200, 200, 200]
