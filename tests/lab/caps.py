"""kvmexit as user nobody with the unit's capabilities, and with one less
each, on the lab's kernel (Debian's 6.1), while a guest makes exits.

    tests/lab/run --outdir OUT -- /usr/bin/python3 tests/lab/caps.py OUT

Runs inside the lab (tests/lab/run), from the repository's top directory.
For each run of RUNS, one after another:
  1. starts a guest of 2 vCPUs (tests/lab/guest.py), held before its first
     KVM_RUN, and arms the kernel's own count (a hist trigger on
     kvm:kvm_exit keyed by thread and exit reason);
  2. starts `kvmexit.py 2` as nobody with only the run's capabilities
     (setpriv, as the unit's AmbientCapabilities= and
     CapabilityBoundingSet= give them) and waits until it has attached or
     ended;
  3. releases the guest, waits for it and for kvmexit, then reads and
     disarms the hist trigger.
"memlock0" is the unit's set under RLIMIT_MEMLOCK 0 (soft and hard): on
6.1 BPF maps are charged to the memory cgroup, not to that limit.
Debian's kernels refuse perf_event_open(2) without CAP_SYS_ADMIN while
kernel.perf_event_paranoid is above 2 (Debian's default is 3, a level of
its own): "paranoid2" is the unit's set with the sysctl at 2 for the run
(restored after), and "root" is kvmexit as root, all capabilities.
It writes OUT/caps.json: per run its capabilities, memlock limit, argv,
exit status, stdout, stderr, the guest's report and the hist counts.
tests/lab/test_lab_caps.py checks them.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, LAB_DIR)
from scenario import (HIST_KEYS, PYTHON, REPO, TRIGGER,  # noqa: E402
                      attached, read_hist, read_json, wait_for)

# The unit's AmbientCapabilities= (deploy/kvmexit.service).
UNIT_CAPS = ("bpf", "perfmon", "dac_read_search", "sys_ptrace")
NOBODY = 65534
DURATION = 2
GUEST_ARGS = ["--io", "40,55", "--cr4", "2,3"]
ATTACH_TIMEOUT = 900            # bcc compiles slowly under the emulator


PARANOID = "/proc/sys/kernel/perf_event_paranoid"


def runs():
    """name: (capabilities or None for root, RLIMIT_MEMLOCK or None for
    the lab's own, perf_event_paranoid or None for the lab's own)."""
    plan = {"full": (UNIT_CAPS, None, None)}
    for cap in UNIT_CAPS:
        plan["without_" + cap] = (tuple(c for c in UNIT_CAPS if c != cap),
                                  None, None)
    plan["memlock0"] = (UNIT_CAPS, 0, None)
    plan["paranoid2"] = (UNIT_CAPS, None, 2)
    plan["root"] = (None, None, None)
    return plan


def command(caps, memlock, script):
    limit = [] if memlock is None else \
        ["prlimit", "--memlock=%d:%d" % (memlock, memlock)]
    tool = [PYTHON, script, str(DURATION)]
    if caps is None:
        return limit + tool
    spec = ",".join(["-all"] + ["+" + c for c in caps])
    return limit + ["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY,
                    "--clear-groups", "--inh-caps=" + spec,
                    "--ambient-caps=" + spec, "--bounding-set=" + spec] + tool


def read_paranoid():
    with open(PARANOID) as f:
        return int(f.read())


def write_paranoid(level):
    with open(PARANOID, "w") as f:
        f.write("%d\n" % level)


def readable_copy():
    """kvmexit.py and bpf/ where nobody can read them."""
    d = tempfile.mkdtemp(prefix="kvmexit-caps-")
    os.chmod(d, 0o755)
    shutil.copy(os.path.join(REPO, "kvmexit.py"), d)
    shutil.copytree(os.path.join(REPO, "bpf"), os.path.join(d, "bpf"))
    return os.path.join(d, "kvmexit.py")


def one_run(name, argv, out):
    report = os.path.join(out, "guest-%s.json" % name)
    hold = os.path.join(out, "go-" + name)
    guest = subprocess.Popen([PYTHON, os.path.join(LAB_DIR, "guest.py")] +
                             GUEST_ARGS + ["--report", report,
                                           "--hold", hold])
    wait_for(lambda: (read_json(report) or {}).get("state") == "ready" or
             guest.poll() is not None, 60, "guest " + name)
    with open(TRIGGER, "w") as f:
        f.write(HIST_KEYS)
    stdout = os.path.join(out, name + ".out")
    stderr = os.path.join(out, name + ".err")
    with open(stdout, "w") as o, open(stderr, "w") as e:
        proc = subprocess.Popen(argv, stdout=o, stderr=e, cwd="/")
    wait_for(lambda: attached((stdout, stderr), proc), ATTACH_TIMEOUT,
             "kvmexit " + name)
    open(hold, "w").close()
    guest_status = guest.wait()
    status = proc.wait(timeout=DURATION + 120)
    hist = read_hist()
    with open(TRIGGER, "w") as f:
        f.write("!" + HIST_KEYS)
    with open(stdout) as o, open(stderr) as e:
        return {"argv": argv, "status": status, "stdout": o.read(),
                "stderr": e.read(), "guest": read_json(report),
                "guest_status": guest_status, "hist": hist}


def main(out):
    script = readable_copy()
    paranoid = read_paranoid()
    results = {}
    for name, (caps, memlock, level) in runs().items():
        started = time.monotonic()
        if level is not None:
            write_paranoid(level)
        try:
            run = one_run(name, command(caps, memlock, script), out)
        finally:
            write_paranoid(paranoid)
        results[name] = dict(run, caps=caps and list(caps), memlock=memlock,
                             paranoid=paranoid if level is None else level)
        print("caps: %s ended with %s in %.0f s" % (
            name, results[name]["status"], time.monotonic() - started),
            flush=True)
    with open(os.path.join(out, "caps.json"), "w") as f:
        json.dump({"runs": results, "kernel": os.uname().release,
                   "memlock": resource.getrlimit(resource.RLIMIT_MEMLOCK),
                   "perf_event_paranoid": paranoid},
                  f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
