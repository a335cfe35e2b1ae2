#!/usr/bin/python3
"""One guest run, watched by many kvmexit instances at once (in the lab).

    tests/lab/run --outdir OUT -- /usr/bin/python3 tests/lab/scenario.py OUT

Runs inside the lab (tests/lab/run), from the repository's top directory:
  1. starts the guests of GUESTS (tests/lab/guest.py), held before their
     first KVM_RUN;
  2. starts every tracer of tracers() -- kvmexit.py with the options of
     one view each -- and waits until each has printed its first line,
     which kvmexit prints only once its probe is attached;
  3. arms the kernel's own count, a hist trigger on kvm:kvm_exit keyed by
     thread and exit reason, then releases the guests and waits for them;
  4. reads and disarms the hist trigger, then ends the tracers (SIGINT,
     except those given a duration or a count, which end by themselves).
It writes OUT/scenario.json: the guests' reports, the hist counts, and each
tracer's argv, exit status, stdout and stderr.  tests/lab/test_lab_kvmexit.py
boots the lab once for it and checks every view against the hist counts.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(LAB_DIR))
TRIGGER = "/sys/kernel/tracing/events/kvm/kvm_exit/trigger"
HIST = "/sys/kernel/tracing/events/kvm/kvm_exit/hist"
HIST_KEYS = "hist:keys=common_pid,exit_reason"
PYTHON = "/usr/bin/python3"
ATTACH_TIMEOUT = 900            # bcc compiles slowly under QEMU's emulator
COMPILES = 2                    # at once, one per CPU of the lab
START = time.monotonic()

# name: guest.py arguments.  qemu: 12 vCPUs (so "CPU 1" vs "CPU 10/KVM"
# matters), each with its own counts; small: a second VM; other: a VMM that
# does not name its threads like QEMU.
GUESTS = {
    "qemu": ["--io", ",".join(str(100 + 10 * i) for i in range(12)),
             "--cr4", ",".join(str(i + 1) for i in range(12))],
    "small": ["--io", "50,70", "--cr4", "3,4"],
    "other": ["--io", "30,40", "--cr4", "2,5", "--thread-name",
              "vcpu-worker-{n}"],
}


def tracers(guests):
    """name: (kvmexit arguments, how it ends: 'sigint' or 'self')."""
    qemu, small, other = (guests[n] for n in ("qemu", "small", "other"))
    tid = lambda g, i: str(g["vcpus"][i]["tid"])
    return {
        "all": (["-d"], "sigint"),
        "all_tracepoint": (["--probe", "tracepoint", "-d"], "sigint"),
        "pid": (["-p", str(qemu["pid"])], "sigint"),
        "pid_alltids": (["-p", str(qemu["pid"]), "-a"], "sigint"),
        "vcpu1": (["-p", str(qemu["pid"]), "-v", "1"], "sigint"),
        "vcpu10": (["-p", str(qemu["pid"]), "-v", "10"], "sigint"),
        "vcpu_other": (["-p", str(other["pid"]), "-v", "1"], "sigint"),
        "tid": (["-t", tid(qemu, 3)], "sigint"),
        "tids": (["-T", tid(qemu, 5) + "," + tid(small, 1)], "sigint"),
        "json_latency": (["--json", "--latency", "--show-vcpu", "-p",
                          str(qemu["pid"])], "sigint"),
        "csv": (["--csv", "--comm", "-p", str(small["pid"])], "sigint"),
        "interval": (["-i", "1", "--timestamp", "-p", str(qemu["pid"])],
                     "sigint"),
        "top_vcpu": (["--top", "2", "--show-vcpu", "-p", str(other["pid"]),
                      "-a"], "sigint"),
        "sigterm": (["-p", str(small["pid"])], "sigterm"),
    }


# Started once the others are attached, so that their time runs while the
# guests do; long enough for the guests to finish under the emulator (they
# run 2 s there, on a busy machine), as the scenario waits for it to end.
DURATION = 15


def start_guest(name, args, out):
    report = os.path.join(out, "guest-%s.json" % name)
    hold = os.path.join(out, "go")
    proc = subprocess.Popen([PYTHON, os.path.join(LAB_DIR, "guest.py")] +
                            args + ["--report", report, "--hold", hold])
    return proc, report


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("scenario: timed out waiting for " + what)
        time.sleep(0.2)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def start_tracer(name, args, out):
    stdout = open(os.path.join(out, "%s.out" % name), "w")
    stderr = open(os.path.join(out, "%s.err" % name), "w")
    proc = subprocess.Popen([PYTHON, "kvmexit.py"] + args, cwd=REPO,
                            stdout=stdout, stderr=stderr)
    return proc, stdout.name, stderr.name


def ended(tracer, argv, timeout):
    """A tracer's argv, exit status and output once it ended (killed after
    `timeout` s: status "killed")."""
    proc, stdout, stderr = tracer
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "killed"
    with open(stdout) as f, open(stderr) as g:
        return {"argv": argv, "status": rc, "stdout": f.read(),
                "stderr": g.read()}


def finish(tracer, how, argv, timeout=120):
    """End a tracer with a signal; its argv, status and output."""
    tracer[0].send_signal(how)
    return ended(tracer, argv, timeout)


def attached(paths, proc):
    """kvmexit prints its first line once tracing has begun (to stderr
    with --json or --csv, after -d's lines)."""
    if proc.poll() is not None:
        return True             # died: reported with its output below
    for path in paths:
        with open(path) as f:
            if any(line.startswith("Display kvm exit reasons")
                   for line in f):
                return True
    return False


def start_attached(running, name, args, out, compiles, deadline=None):
    """Start a tracer once fewer than `compiles` are still compiling (each
    of bcc's compiles takes a few hundred MB); with compiles=1, return once
    it is attached.  deadline: time.monotonic()'s, by default
    ATTACH_TIMEOUT after this script started."""
    if deadline is None:
        deadline = START + ATTACH_TIMEOUT
    running[name] = start_tracer(name, args, out)
    while True:
        compiling = [n for n, (proc, *logs) in running.items()
                     if not attached(logs, proc)]
        if len(compiling) < compiles:
            return
        if time.monotonic() > deadline:
            script = os.path.splitext(os.path.basename(sys.argv[0]))[0]
            raise SystemExit("%s: timed out waiting for %s"
                             % (script, ", ".join(compiling)))
        time.sleep(0.5)


def read_hist():
    """{(tid, exit_reason): count} from the hist trigger."""
    with open(HIST) as f:
        text = f.read()
    counts = {}
    for tid, reason, hits in re.findall(
            r"common_pid:\s*(\d+), exit_reason:\s*(\d+) \} hitcount:\s*(\d+)",
            text):
        counts["%s,%s" % (tid, reason)] = int(hits)
    return counts


def collect(running, plan, timeout):
    """ended() of each running tracer, by name."""
    return {name: ended(tracer, plan[name][0], timeout)
            for name, tracer in running.items()}


def main(out):
    guests = {name: start_guest(name, args, out)
              for name, args in GUESTS.items()}
    for name, (proc, report) in guests.items():
        wait_for(lambda: (read_json(report) or {}).get("state") == "ready" or
                 proc.poll() is not None, 60, "guest " + name)
        if proc.poll() is not None:
            raise SystemExit("scenario: guest %s failed" % name)
    ready = {name: read_json(report) for name, (_, report) in guests.items()}

    running = {}
    plan = tracers(ready)
    plan["duration"] = (["-p", str(ready["small"]["pid"]), str(DURATION)],
                        "self")
    started = time.monotonic()
    for name in plan:
        if name != "duration":
            start_attached(running, name, plan[name][0], out, COMPILES)
    start_attached(running, "duration", plan["duration"][0], out, 1)
    print("scenario: %d tracers attached in %.0f s" %
          (len(running), time.monotonic() - started), flush=True)

    with open(TRIGGER, "w") as f:
        f.write(HIST_KEYS)
    released = time.monotonic()
    open(os.path.join(out, "go"), "w").close()
    statuses = {name: proc.wait() for name, (proc, _) in guests.items()}
    ran = time.monotonic() - released
    hist = read_hist()
    with open(TRIGGER, "w") as f:
        f.write("!" + HIST_KEYS)

    for name, (proc, _, _) in running.items():
        how = plan[name][1]
        if how in ("sigint", "sigterm"):
            proc.send_signal(signal.SIGINT if how == "sigint" else
                             signal.SIGTERM)
    results = collect(running, plan, DURATION + 120)
    with open(os.path.join(out, "scenario.json"), "w") as f:
        json.dump({"guests": {n: read_json(r) for n, (_, r) in
                              guests.items()},
                   "guest_status": statuses, "guest_seconds": ran,
                   "hist": hist, "tracers": results}, f, indent=1)
    print("scenario: guests ran %.1f s; results in %s" % (ran, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
