"""The lab tests' pytest glue: each lab boots once per test session.

A lab test module names its scenario, a command run in a lab that writes
its results to a directory of its own:

    SCENARIO = Scenario("kvmexit", script="tests/lab/scenario.py")

    @pytest.fixture(scope="module")
    def lab(lab_runs):
        return lab_runs.results(SCENARIO, "scenario.json")

Once pytest has collected the tests, LabRuns knows every scenario the
session needs (tests/lab/conftest.py).  The scenarios of one lab run one
after another in one boot of it (tests/lab/sequence.py), each with its own
directory, timeout and exit status, and no hist trigger left over from
the one before: a scenario that fails fails only its own module's tests.
Every lab the session needs starts in the background as soon as the
tests are collected (conftest.py), so that their boots and scenarios
overlap the host tests; the tests that read a lab's results run last
(conftest.py orders them).  The longest lab (LABS[0] of those needed)
starts first and keeps its CPU: a lab that can wait (the Intel lab)
yields to it (nice), so that the machine's two CPUs run the critical
path and everything else beside it.  A lab that freezes is booted again
once, in new directories, for the scenarios that had not finished; a
second freeze fails their tests.  A scenario's environment variable
(`env`), set to an earlier run's directory, checks that run's results
again without booting (while working on the tests).
"""

import collections
import json
import os
import tempfile
import threading
import time

import kvmexit
from core import GUEST_PYTHON, LAB_DIR, LabError, LabFrozen, lab_of

# The labs, longest run first.
LABS = ("amd", "amd2", "arm64", "intel")
# The nice value, added to the session's, of a lab that can wait: it runs
# on the CPU the longest leaves, or when the host tests wait.
YIELD = 10


class Scenario:
    """A command run in a lab for one test module: `script OUTDIR`, or
    `command(OUTDIR)` (an argv) for one built at run time."""

    def __init__(self, name, script=None, command=None, lab="amd",
                 timeout=1800, env=None):
        self.name, self.lab, self.timeout, self.env = name, lab, timeout, env
        self.command = command or (lambda outdir: [GUEST_PYTHON, script,
                                                   outdir])


class LabRuns:
    """The session's lab runs: one boot per lab for all its scenarios."""

    def __init__(self, scenarios, base=None, lab_of=lab_of):
        self.base = base            # made when a lab first boots
        self.lab_of = lab_of
        self.groups = {}
        for s in scenarios:
            if not (s.env and os.environ.get(s.env)):
                self.groups.setdefault(s.lab, {})[s.name] = s
        self.done = {}              # lab kind: {scenario name: outdir}
        self.errors = {}            # lab kind: why it could not run
        self.threads = {}
        self.labs = []
        self.retried = 0            # boots again after a lab froze
        self.created = time.monotonic()
        self.times = {}             # lab kind: (start, seconds)

    def kinds(self):
        """The labs needed, the longest first."""
        return sorted(self.groups, key=lambda kind: (
            LABS.index(kind) if kind in LABS else len(LABS), kind))

    def start_all(self):
        """Start every lab needed in the background, the longest first.
        Those after it that can wait yield the CPU to it (nice).  A lab
        whose markers are seen live cannot: its boot limit runs on this
        machine's clock, and a starved boot would look frozen."""
        for i, kind in enumerate(self.kinds()):
            can_wait = i > 0 and not self.lab_of(kind).live_markers
            self.start_in_background(kind, nice=YIELD if can_wait else 0)

    def start_in_background(self, kind, nice=0):
        if kind in self.groups and kind not in self.threads:
            thread = threading.Thread(target=self.run_niced,
                                      args=(kind, nice), daemon=True)
            self.threads[kind] = thread
            thread.start()

    def run_niced(self, kind, nice):
        # On Linux a nice value is a thread's own, and what the thread
        # starts (the lab's emulator) inherits it.
        if nice:
            me = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, me,
                           os.getpriority(os.PRIO_PROCESS, me) + nice)
        self.run_group(kind)

    def cancel(self):
        """Stop the labs still running (the session ends) and wait for
        their threads."""
        for lab in self.labs:
            lab.cancelled.set()
        for thread in self.threads.values():
            thread.join(60)

    def outdir(self, scenario):
        """The scenario's directory once its lab has run it; fails the test
        unless it ended with status 0."""
        if scenario.env and os.environ.get(scenario.env):
            return os.environ[scenario.env]
        kind = scenario.lab
        if kind in self.threads:
            self.threads[kind].join()
        elif kind not in self.done and kind not in self.errors:
            self.groups.setdefault(kind, {})[scenario.name] = scenario
            self.run_group(kind)
        if kind in self.errors:
            raise AssertionError(self.errors[kind])
        out = self.done[kind][scenario.name]
        status = read_json(os.path.join(out, "status"))
        if status is None or status["status"] != 0:
            raise AssertionError(
                f"{scenario.name} failed ({status}) in the {kind} lab:\n" +
                read_text(os.path.join(out, "output"))[-4000:])
        return out

    def results(self, scenario, name):
        """The JSON file `name` the scenario wrote."""
        with open(os.path.join(self.outdir(scenario), name)) as f:
            return json.load(f)

    def summary(self):
        """Lines for the end of the session (none if it needed no lab):
        each lab's time, its scenarios' (the rest is its boot), and how
        many boots there were, how many were retried, froze or ran out of
        time."""
        if not self.groups:
            return []
        lines = [f"lab {kind}: {seconds:.0f} s, from {start:.0f} s into the "
                 "session: " + ", ".join(
                     f"{name} {scenario_seconds(out)} s"
                     for name, out in self.done.get(kind, {}).items())
                 for kind, (start, seconds) in self.times.items()]
        tally = collections.Counter(retried=self.retried)
        for lab in {id(lab): lab for lab in self.labs}.values():
            tally.update(lab.tally)         # each lab once
        lines.append(f"lab boots {tally['boots']}, retried "
                     f"{tally['retried']}, frozen {tally['frozen']}, "
                     f"timed out {tally['timed out']}")
        return lines

    def run_group(self, kind):
        """Boot the lab once for the scenarios of its group; a lab that
        froze once more, in new directories, for those left."""
        scenarios = list(self.groups[kind].values())
        started = time.monotonic()
        try:
            try:
                self.boot(kind, scenarios, 1)
            except LabFrozen as e:
                print(f"lab: {e}; booting it again, once", flush=True)
                self.retried += 1
                self.boot(kind, scenarios, 2)
        except LabError as e:
            self.errors[kind] = (f"the {kind} lab did not run "
                                 f"{', '.join(s.name for s in scenarios)}: "
                                 f"{e}\n{e.output[-3000:]}")
        self.times[kind] = (started - self.created,
                            time.monotonic() - started)
        # A lab in the background would print into whichever test's
        # output is being captured; its time is in the session's summary.
        if kind not in self.threads:
            print(f"lab: the {kind} lab's scenarios in "
                  f"{self.times[kind][1]:.0f} s in all", flush=True)

    def boot(self, kind, scenarios, attempt):
        """One boot running the scenarios not done yet (each in a new
        directory: a frozen run's files would mislead)."""
        done = self.done.setdefault(kind, {})
        left = [s for s in scenarios if s.name not in done or
                read_json(os.path.join(done[s.name], "status")) is None]
        self.base = self.base or tempfile.mkdtemp(prefix="kvmexit-lab-runs-")
        top = os.path.join(self.base, f"{kind}-{attempt}")
        plan = []
        for s in left:
            out = os.path.join(top, s.name)
            os.makedirs(out)
            done[s.name] = out
            plan.append({"name": s.name, "argv": s.command(out),
                         "outdir": out, "timeout": s.timeout})
        path = os.path.join(top, "plan.json")
        with open(path, "w") as f:
            json.dump(plan, f, indent=1)
        # Scenarios of the background lab keep quiet: their output is in
        # their directories.
        quiet = kind in self.threads
        lab = self.lab_of(kind)
        self.labs.append(lab)
        rc, output = lab.run(
            [GUEST_PYTHON, os.path.join(LAB_DIR, "sequence.py"), path],
            timeout=sum(s.timeout for s in left) + 600, outdir=top,
            quiet=quiet)
        if rc != 0:
            raise LabError(f"sequence.py ended with status {rc}", output)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


# What the test files read of a scenario's results.
def tracer(lab, name):
    """One kvmexit's argv, status, stdout and stderr; it ended with 0."""
    t = lab["tracers"][name]
    assert t["status"] == 0, t
    return t


def report_rows(text, ids):
    """A text report's rows after its header line: ids ints (PID, TID),
    the reason's name, its count."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if "KVM_EXIT_REASON" in line) + 1
    parsed = []
    for line in lines[start:]:
        if not line.strip():
            break
        cells = line.split()
        parsed.append(tuple(int(c) for c in cells[:ids]) +
                      (cells[ids], int(cells[ids + 1])))
    return parsed


# The views' expected output, from the exits the kernel counted:
# {(pid, tid, code): count} of one isa, whose names the rows show.
FIRST = "Display kvm exit reasons and statistics for "
NAMES = kvmexit.ReasonNames()


def kernel_counts(lab, hist, guest=None, tids=None):
    """{(pid, tid, code): count} of a hist trigger's (tid, code, count)
    rows, for the scenario's guests' vCPU threads (of one guest, or of
    some threads)."""
    counts = collections.Counter()
    for name, g in lab["guests"].items():
        for v in g["vcpus"]:
            if (guest and name != guest) or (tids and v["tid"] not in tids):
                continue
            for tid, code, n in hist:
                if tid == v["tid"]:
                    counts[(g["pid"], tid, code)] += n
    return dict(counts)


def tid_of(lab, guest, index):
    """The TID of a scenario's guest's vCPU `index`."""
    return lab["guests"][guest]["vcpus"][index]["tid"]


def collapsed(counts, isa):
    """[(name, count)] as the one-list views sort them."""
    merged = collections.Counter()
    for (_, _, code), n in counts.items():
        merged[code] += n
    return [(NAMES.name(isa, c), n) for c, n in
            sorted(merged.items(), key=lambda cn: (-cn[1], cn[0]))]


def per_thread(counts, with_pid, isa):
    """[(ids..., name, count)] as the views with threads sort them."""
    def order(item):
        (pid, tid, code), n = item
        return ((pid, tid) if with_pid else tid), -n, code
    return [((pid, tid) if with_pid else (tid,)) +
            (NAMES.name(isa, code), n)
            for (pid, tid, code), n in sorted(counts.items(), key=order)]


def check_all_threads(t, counts, isa):
    """No filter: every vCPU thread, with bcc's header and widths."""
    lines = t["stdout"].splitlines()
    assert lines[:3] == [FIRST + "all threads... Hit Ctrl-C to end.", "",
                         "PID      TID      KVM_EXIT_REASON" + " " * 21 +
                         "COUNT"]
    expected = per_thread(counts, True, isa)
    assert report_rows(t["stdout"], 2) == expected
    # bcc's widths: "%-8u %-8u %-35s %-8u".
    assert lines[3] == "%-8u %-8u %-35s %-8u" % expected[0]


def check_one_list(t, context, counts, isa):
    """-p, -p -v, -t: one list of reasons, after `context`'s first line."""
    assert t["stdout"].splitlines()[0] == \
        FIRST + "%s... Hit Ctrl-C to end." % context
    assert report_rows(t["stdout"], 0) == collapsed(counts, isa)


def check_pid_alltids(t, pid, counts, isa):
    lines = t["stdout"].splitlines()
    assert lines[0] == FIRST + "PID %d and its all threads... Hit Ctrl-C " \
        "to end." % pid
    assert lines[2].startswith("TID      KVM_EXIT_REASON")
    assert report_rows(t["stdout"], 1) == per_thread(counts, False, isa)


def check_tids(t, tids, counts, isa):
    lines = t["stdout"].splitlines()
    assert lines[0] == FIRST + "TIDS %s... Hit Ctrl-C to end." \
        % [str(tid) for tid in tids]
    assert lines[2].startswith("TIDS     KVM_EXIT_REASON")
    assert report_rows(t["stdout"], 1) == per_thread(counts, False, isa)


def guest_vcpus(lab):
    """The scenario's one guest's vCPUs; it and each of them ran without
    an error."""
    assert lab["guest_status"] == 0
    for v in lab["guest"]["vcpus"]:
        assert v["errors"] == [], v
    return lab["guest"]["vcpus"]


def scenario_seconds(outdir):
    """How long the scenario ran, as its status says ("-": it did not
    end)."""
    status = read_json(os.path.join(outdir, "status"))
    return "-" if status is None else f"{status['seconds']:.0f}"


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return "(no output)"


def module_scenarios(items):
    """The scenarios of the collected test modules, each once."""
    found = {}
    for item in items:
        module = getattr(item, "module", None)
        scenario = getattr(module, "SCENARIO", None)
        if isinstance(scenario, Scenario):
            found[scenario.name] = scenario
    return list(found.values())
