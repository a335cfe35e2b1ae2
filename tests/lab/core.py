"""The lab runner's core: boot a lab machine, run one command in it, and
say how it went.  What every lab shares is here; each lab (amd.py: QEMU
with an AMD CPU; intel.py: Bochs with an Intel CPU) is a subclass of Lab
that adds only its machine:

    launch()      copy the run's input in, if the machine shares no files
                  with this one, and start the emulator; give its process
                  and its console
    setup()       install what the machine needs (once), give the kernel
    prepare()     build its disk images, if any (once per change)
    copy_out()    bring back what the command wrote under `outdir`
    diagnose()    where a frozen machine's CPUs are
    kernel_log()  the end of what its kernel logged

    from amd import AmdLab
    rc, output = AmdLab().run(["/usr/bin/python3", "kvmexit.py", "-h"],
                              timeout=300, outdir=str(tmp_path))

The run, for every lab alike: the machine boots tests/lab/init.py as the
lab's first process, which checks the lab (tracefs, KVM, headers) and
runs the command.  It reports through marker files in a directory under
`outdir` -- ready (checks passed), heartbeat (every HEARTBEAT s), status
(the command's exit status) or error (the checks failed) -- not through
output the command could imitate.  A lab whose markers are seen live
(a shared filesystem) and that is not ready within `boot_limit` s, or
that misses heartbeats for `frozen_after` s, has frozen: it is stopped
(LabFrozen, after diagnose()); one frozen while booting is booted again,
once, as its command has not started.  Any failure raises LabError,
never skips, and its message ends with the kernel's log.
"""

import codecs
import collections
import contextlib
import importlib
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(LAB_DIR))
INIT = os.path.join(LAB_DIR, "init.py")
# Inside the lab only Debian's interpreter has bcc; use it for everything.
GUEST_PYTHON = "/usr/bin/python3"
HEARTBEAT = 5
# Time a stopped machine gets between SIGTERM and SIGKILL.
KILL_GRACE = 10
# The labs: kind -> (module, class), imported only when used.  "amd2" is a
# second AMD lab, booted beside the first: each emulator runs on one host
# CPU (amd.py), so the AMD scenarios are shared between two of them.
LABS = {"amd": ("amd", "AmdLab"), "amd2": ("amd", "AmdLab"),
        "intel": ("intel", "IntelLab"), "arm64": ("arm64", "Arm64Lab")}


class LabError(Exception):
    """The lab could not run the command; `output` has what it printed."""

    def __init__(self, message, output=""):
        super().__init__(message)
        self.output = output


class LabFrozen(LabError):
    """The lab's kernel stopped running anything: it did not finish booting,
    or no heartbeat came while the command ran (`booted`)."""

    def __init__(self, message, output="", booted=True):
        super().__init__(message, output)
        self.booted = booted


def lab_of(kind):
    """A new Lab of a kind of LABS."""
    module, name = LABS[kind]
    return getattr(importlib.import_module(module), name)()


def shell_command(cmd):
    """`cmd`, an argv list or one /bin/sh command line, as a line."""
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


def read_marker(markers, name):
    try:
        with open(os.path.join(markers, name)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_marker(markers, name, value):
    with open(os.path.join(markers, name), "w") as f:
        json.dump(value, f)


def marker_age(markers, name):
    """Seconds since the marker was written (its mtime is this machine's
    clock where the markers are shared), or None if it was not."""
    try:
        return time.time() - os.path.getmtime(os.path.join(markers, name))
    except FileNotFoundError:
        return None


def run_setup(script):
    """Run a lab's setup script (fast when nothing is missing); return the
    kernel image it prints."""
    proc = subprocess.run(["/bin/bash", script], stdout=subprocess.PIPE,
                          text=True)
    kernel = proc.stdout.strip()
    if proc.returncode != 0 or not os.path.isfile(kernel):
        raise LabError(f"{script} failed (status {proc.returncode}); "
                       "see its messages above")
    return kernel


def tail(path, lines):
    """The last `lines` lines of a text file, or None if there is none."""
    try:
        with open(path, errors="replace") as f:
            return "\n".join(f.read().replace("\r\n", "\n")
                             .splitlines()[-lines:])
    except FileNotFoundError:
        return None


class Machine:
    """A started emulator: its process and its console (a file object to
    read the console's bytes from as they come; None: not connected yet,
    see Lab.connect)."""

    def __init__(self, proc, console):
        self.proc, self.console = proc, console

    def close(self):
        if self.console is not None:
            self.console.close()


class Run:
    """One boot of a lab: its directories and what it has said so far."""

    def __init__(self, outdir, work, started):
        self.outdir, self.work = outdir, work
        # The init's markers: under outdir, which every lab brings back.
        self.markers = tempfile.mkdtemp(prefix=".lab-", dir=outdir)
        self.started = started            # time.time() at launch
        self.target = None                # what Lab.prepare() gave
        self.chunks = []
        self.why_frozen = ""

    def text(self):
        return b"".join(self.chunks).decode(errors="replace") \
            .replace("\r\n", "\n").replace("\r", "")


class Lab:
    """The runner; a subclass adds its machine (see the module's doc)."""

    name = "lab"            # in messages: "the lab froze: ..."
    tag = "lab"             # the prefix of its own lines
    boot_limit = 300        # s; a boot takes 20-60 s on the AMD lab
    frozen_after = 120      # s without a heartbeat while the command runs
    # Markers are seen while the lab runs (a shared filesystem); without
    # that, only `timeout` ends a lab that hangs.
    live_markers = True
    # The console is shown from the line that starts with this on (None:
    # all of it): a lab whose boot is long and chatty shows it only when
    # it fails.
    show_from = None

    def __init__(self):
        # Set from another thread (the end of a test session): the lab is
        # stopped and its run fails.
        self.cancelled = threading.Event()
        # Boots, retried boots, freezes and timeouts, for the session's
        # summary line (fixtures.LabRuns.summary).
        self.tally = collections.Counter()

    # --- what a machine adds ------------------------------------------------

    def setup(self):
        raise NotImplementedError

    def launch(self, target, init_command, run):
        """Start the machine booting `target` (what prepare() gave); its
        first process runs the shell line `init_command`.  Return a
        Machine, whose process leads a session of its own (stop() ends the
        whole group)."""
        raise NotImplementedError

    def prepare(self, kernel):
        """Build what runs need (cached); return what launch() needs."""
        return kernel

    def lock(self):
        """Held around a run: a machine that cannot run twice at once."""
        return contextlib.nullcontext()

    def copy_out(self, run):
        """Bring back what the command wrote under run.outdir; return False
        if the machine wrote nothing back."""
        return True

    def connect(self, machine):
        """A console that connects late (a socket): return it once there."""
        return machine.console

    def failed(self, run):
        """Why the machine has failed, from its console so far, or ""."""
        return ""

    def output(self, run):
        """The command's output (stdout and stderr together)."""
        return run.text()

    def diagnose(self, run):
        """Where a frozen machine's CPUs are, or why it cannot say."""
        return ""

    def kernel_log(self, run):
        """The end of the kernel's log, for a failure's message."""
        return "(no kernel log)"

    def release(self, kernel):
        return os.path.basename(kernel).removeprefix("vmlinuz-")

    def init_command(self, run, release, command):
        """The shell line the machine runs as the lab's first process."""
        return shlex.join([GUEST_PYTHON, INIT, run.markers, release,
                           command])

    # --- the runner ---------------------------------------------------------

    def run(self, cmd, timeout, outdir, quiet=False):
        """Run `cmd` in a freshly booted lab; return (exit status, output).

        `timeout` (seconds) bounds boot, command and the way back, not the
        one-time install and image build.  `outdir` is created if needed;
        the command can write there, at the same path, and what it writes
        is there afterwards.  Unless `quiet`, the console is also copied to
        sys.stdout as it comes, with a last line of timings.  A lab frozen
        while booting is booted again, once."""
        # sys.stdout now, not at import: pytest swaps it per test.
        echo = None if quiet else sys.stdout
        kernel = self.setup()
        outdir = os.path.abspath(outdir)
        os.makedirs(outdir, exist_ok=True)
        with self.lock():
            target = self.prepare(kernel)
            release = self.release(kernel)
            try:
                return self.boot_and_run(cmd, target, release, timeout,
                                         outdir, echo)
            except LabFrozen as e:
                if e.booted:
                    raise
                print(f"{self.tag}: {e}\n{self.tag}: booting it again, once",
                      flush=True)
                self.tally["retried"] += 1
            return self.boot_and_run(cmd, target, release, timeout, outdir,
                                     echo)

    def boot_and_run(self, cmd, target, release, timeout, outdir, echo):
        """One boot: `target` is what prepare() gave."""
        work = tempfile.mkdtemp(prefix="kvmexit-lab-")
        run = Run(outdir, work, time.time())
        try:
            run.target = target
            init = self.init_command(run, release, shell_command(cmd))
            started = time.monotonic()
            self.tally["boots"] += 1
            machine = self.launch(target, init, run)
            try:
                how = self.watch(machine, run, started + timeout, echo)
            finally:
                self.stop(machine)
            return self.conclude(how, run, timeout,
                                 time.monotonic() - started, echo)
        finally:
            shutil.rmtree(run.markers, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)

    def watch(self, machine, run, deadline, echo):
        """Follow the console until the machine ends; return how it ended:
        'off', 'frozen', 'timeout', 'failed' or 'cancelled'."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        shown = self.show_from is None
        pending = ""
        console = None
        checked = beat = time.monotonic()
        while True:
            console = console or self.connect(machine)
            if console is None:
                time.sleep(1)
                data = b""
            else:
                data = read_some(console, 1)
            if data:
                run.chunks.append(data)
                if echo is not None:
                    pending, shown = self.show(echo, pending +
                                               decoder.decode(data), shown)
            elif data is None or (console is None and
                                  machine.proc.poll() is not None):
                machine.proc.wait()
                return "off"
            # Every second, also while output comes: a stuck kernel can
            # still print.
            now = time.monotonic()
            if now - checked < 1:
                continue
            checked = now
            if self.failed(run):
                return "failed"
            if self.cancelled.is_set():
                return "cancelled"
            if now > deadline:
                return "timeout"
            if now - beat >= HEARTBEAT:
                beat = now
                run.why_frozen = self.frozen(run.markers, run.started)
                if run.why_frozen:
                    diagnosis = self.diagnose(run)
                    if diagnosis:
                        run.why_frozen += "; " + diagnosis
                    return "frozen"

    def show(self, echo, text, shown):
        """Echo whole lines (all, or from the show_from line on); return
        what is left of a line and whether showing has begun."""
        *lines, rest = text.split("\n")
        for line in lines:
            line = line.replace("\r", "")
            shown = shown or line.startswith(self.show_from)
            if shown:
                echo.write(line + "\n")
        echo.flush()
        return rest, shown

    def stop(self, machine):
        """End the machine's whole process group, if it still runs."""
        proc = machine.proc
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        machine.close()

    def frozen(self, markers, launched):
        """Why the lab looks frozen, or "" (`launched`: time.time() at
        launch)."""
        if not self.live_markers:
            return ""
        if marker_age(markers, "status") is not None or \
                marker_age(markers, "error") is not None:
            return ""
        beats = [a for a in (marker_age(markers, "heartbeat"),
                             marker_age(markers, "ready")) if a is not None]
        if not beats:
            if time.time() - launched > self.boot_limit:
                return f"not booted after {self.boot_limit} s"
            return ""
        if min(beats) > self.frozen_after:
            return f"no heartbeat for {self.frozen_after} s while running " \
                "the command"
        return ""

    def conclude(self, how, run, timeout, elapsed, echo):
        """Turn how the machine ended and the markers into (status,
        output), or LabError."""
        text = run.text()
        if how == "frozen":
            self.tally["frozen"] += 1
            booted = os.path.exists(os.path.join(run.markers, "ready"))
            raise LabFrozen(f"the {self.name} froze: {run.why_frozen}\n"
                            f"{self.kernel_log(run)}", text, booted)
        if how == "failed":
            raise LabError(f"the {self.name} failed: {self.failed(run)}\n"
                           f"{self.kernel_log(run)}", text)
        if how == "cancelled":
            raise LabError(f"the {self.name} was stopped: the run was "
                           "cancelled", text)
        if how == "timeout":
            self.tally["timed out"] += 1
            where = "running the command" if self.booted(run) else "booting"
            raise LabError(f"the {self.name} timed out after {timeout} s "
                           f"while {where}\n{self.kernel_log(run)}", text)
        if not self.copy_out(run):
            raise LabError(f"the {self.name} wrote nothing back\n"
                           f"{self.kernel_log(run)}", text)
        output = self.output(run)
        failed = read_marker(run.markers, "error")
        done = read_marker(run.markers, "status")
        if failed is not None:
            raise LabError(f"lab checks failed: {failed['error']}\n"
                           f"{self.kernel_log(run)}", output)
        if done is None:
            where = "running the command" if self.booted(run) else "booting"
            raise LabError(f"the {self.name} stopped while {where}; its "
                           f"output ends:\n{text[-2000:]}\n"
                           f"{self.kernel_log(run)}", output)
        if echo is not None:
            ready = read_marker(run.markers, "ready")
            echo.write(f"{self.tag}: exit status {done['status']}; the "
                       f"command started at guest uptime "
                       f"{ready['uptime']:.1f} s; {elapsed:.1f} s in all\n")
            echo.flush()
        return done["status"], output

    def booted(self, run):
        """Whether the init's checks passed (the command started)."""
        return os.path.exists(os.path.join(run.markers, "ready"))


def read_some(console, wait):
    """Bytes that came within `wait` s (b"" if none), None at the end."""
    if not select.select([console], [], [], wait)[0]:
        return b""
    data = os.read(console.fileno(), 65536)
    return data or None
