#!/usr/bin/python3
"""Several test scenarios, one after another, in one lab boot.

    sequence.py PLAN.json        (in the lab; fixtures.py writes the plan)

The plan is a list of {"name", "argv", "outdir", "timeout"}.  Each scenario
runs from the repository's top directory with its own output directory,
its output going to OUTDIR/output (and to the console), and ends by
itself or after its timeout.  Its exit status goes to OUTDIR/status, so
that each test module sees only its own scenario's success.  A scenario
that already has a status (from a run before a freeze) is not run again.
Before each, every hist trigger left on a KVM event is removed, so that
none counts into the next one.  Exits 0 once all have run.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

TRIGGERS = "/sys/kernel/tracing/events/kvm/*/trigger"


def clear_triggers():
    for path in glob.glob(TRIGGERS):
        with open(path) as f:
            lines = [line.split(" [")[0].strip() for line in f
                     if line.strip() and not line.startswith("#")]
        for line in lines:
            try:
                with open(path, "a") as f:
                    f.write("!" + line)
            except OSError as e:
                print(f"lab: cannot remove {line} from {path}: {e}",
                      flush=True)


def run_one(scenario):
    outdir = scenario["outdir"]
    os.makedirs(outdir, exist_ok=True)     # a lab that copies files back
    status_file = os.path.join(outdir, "status")
    if os.path.exists(status_file):
        return
    print(f"lab: scenario {scenario['name']}", flush=True)
    clear_triggers()
    started = time.monotonic()
    with open(os.path.join(outdir, "output"), "wb") as out:
        # A session of its own: at its timeout, its guests go with it.
        proc = subprocess.Popen(scenario["argv"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = started + scenario["timeout"]
        try:
            copy(proc, out, deadline)
            status = proc.wait(max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = 124
            out.write(f"\nlab: {scenario['name']} ran out of its "
                      f"{scenario['timeout']} s\n".encode())
    elapsed = time.monotonic() - started
    with open(status_file, "w") as f:
        json.dump({"status": status, "seconds": round(elapsed, 1)}, f)
    print(f"lab: scenario {scenario['name']}: status {status} in "
          f"{elapsed:.0f} s", flush=True)


def copy(proc, out, deadline):
    """Copy the scenario's output to its file and the console until it
    ends; TimeoutExpired after `deadline`."""
    os.set_blocking(proc.stdout.fileno(), False)
    while True:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, 0)
        try:
            data = os.read(proc.stdout.fileno(), 65536)
        except BlockingIOError:
            time.sleep(0.2)
            continue
        if not data:
            return
        out.write(data)
        out.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def main(plan):
    with open(plan) as f:
        for scenario in json.load(f):
            run_one(scenario)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
