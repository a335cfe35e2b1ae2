"""The lab's own test: its KVM guests make exactly the exits they promise.

    /usr/bin/python3 -m pytest -v tests/lab/test_lab_guest.py   (as root)

Boots the lab (a minute or so), runs three guest.py VMs side by side and
counts their exits with the kernel's own hist triggers: on kvm:kvm_exit
per reason for two of them, and, for the third (DETAIL: ports, MSRs,
CPUID, hypercalls, MMIO, exceptions), on every tracepoint its report names
(kvm_exit, kvm_pio, kvm_msr, kvm_mmio, ...) with that tracepoint's own
keys.  The counts kvmexit is later checked against are only trustworthy
if these hold exactly.  It never skips: if the lab cannot run, it fails
saying why.
"""

import json
import os
import pathlib
import re
import shlex
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixtures import Scenario  # noqa: E402

# SVM exit codes (arch/x86/include/uapi/asm/svm.h); the lab's CPU is AMD.
READ_CR4, WRITE_CR4, HLT, IOIO = 0x04, 0x14, 0x78, 0x7b

# Two VMs (processes); per vCPU: OUT exits, CR4 read+write pairs.  Zeros
# check that nothing is counted where nothing happens.
GUESTS = {"a": {"io": [100, 1000, 5000], "cr4": [5, 0, 1000]},
          "b": {"io": [7, 0], "cr4": [1, 64]}}

# The detail guest: every kind of step, different counts per vCPU and per
# key so that a mix-up shows; each MMIO page used by one vCPU only.  Two
# MMIO keys share a page (0xd0000000) and two others (0xd0002000): only the
# first access to a page takes the "not mapped yet" path.  #UD is the one
# exception this lab can show: QEMU's emulated SVM delivers int3 as a
# software interrupt, never as the #BP exception KVM intercepts under guest
# debug (exc:3), and raises #UD for icebp (exc:1 would be a #DB).
USER_MSR = 0x4b4d0000           # unknown to KVM: a user-space MSR exit
DETAIL = ["--io", "0", "--cr4", "3,0"] + [arg for step in (
    "0@out:0x70/1:11", "0@out:0x71/2:12", "0@out:0x72/4:13",
    "0@in:0x73/1:14", "0@in:0x74/2:15", "0@in:0x75/4:16",
    "0@rdmsr:0x1b:21", "0@wrmsr:0x1b:22", "0@rdmsr:0x1a0:23",
    "0@wrmsr:0x1a0:24", "0@rdmsr:0x6e0:25", "0@wrmsr:0x6e0:26",
    f"0@rdmsr:{USER_MSR:#x}:27", f"0@wrmsr:{USER_MSR:#x}=0x1234:28",
    "0@cpuid:0:31", "0@cpuid:0x80000001:32",
    "0@hypercall:0x100:41", "0@hypercall:1:42",
    "0@mmio-write:0xd0000000/1:51", "0@mmio-write:0xd0000010/2:52",
    "0@mmio-write:0xd0001000/4:53", "0@mmio-read:0xd0002000/4:54",
    "0@mmio-read:0xd0002008/1:55", "0@exc:6:62",
    "1@out:0x70/1:7", "1@rdmsr:0x1b:5", "1@cpuid:1:9",
    "1@hypercall:0x100:4", "1@mmio-write:0xe0000000/4:6",
    "1@mmio-read:0xe0000ff0/2:3", "1@exc:6:2")
    for arg in ("--do", step)]

TRIGGER = "hist:keys=common_pid.execname,exit_reason"
# The detail guest's triggers: event, keys after common_pid (a hist key has
# at most three fields), and fields fixed by a filter instead of a key.
DETAIL_TRIGGERS = [
    ("kvm_exit", ("exit_reason", "info1"), {}),
    ("kvm_exit", ("exit_reason", "info2"), {}),
    ("kvm_exit", ("exit_reason", "intr_info"), {}),
    ("kvm_pio", ("port", "size"), {"rw": 0}),
    ("kvm_pio", ("port", "size"), {"rw": 1}),
    ("kvm_msr", ("ecx", "write"), {}),
    ("kvm_mmio", ("type", "gpa"), {}),
    ("kvm_hypercall", ("nr",), {}),
    ("kvm_cpuid", ("function",), {}),
    ("kvm_inj_exception", ("exception", "reinjected"), {}),
    ("kvm_page_fault", ("fault_address", "error_code"), {}),
    ("kvm_userspace_exit", ("reason", "errno"), {}),
]
EVENTS = "/sys/kernel/tracing/events/kvm"
GUEST_TIMEOUT = 300             # seconds; a run takes a few
RAM_END = 0x10000               # guest.py's RAM: NPFs below it are noise
HIST_LINE = re.compile(r"\{ common_pid: (?P<comm>.*?)\s*\[\s*(?P<tid>\d+)\], "
                       r"exit_reason:\s*(?P<reason>\d+) \} "
                       r"hitcount:\s*(?P<count>\d+)")


def lab_script(outdir):
    """Shell commands for the lab: start the VMs held, trace, release."""
    event = f"{EVENTS}/kvm_exit"
    go = f"{outdir}/go"
    lines = ["set -e"]
    guests = {name: ["--io", ",".join(map(str, g["io"])),
                     "--cr4", ",".join(map(str, g["cr4"]))]
              for name, g in GUESTS.items()}
    guests["detail"] = DETAIL
    for name, args in guests.items():
        # Bounded: a guest that hangs fails the run, its histograms kept.
        argv = ["timeout", str(GUEST_TIMEOUT), "/usr/bin/python3",
                "tests/lab/guest.py"] + args + [
            "--hold", go, "--report", f"{outdir}/{name}.json"]
        lines += [shlex.join(argv) + " &", f"pid_{name}=$!"]
    reports = " && ".join(f"[ -e {outdir}/{n}.json ]" for n in guests)
    lines += [
        # The trigger goes on only once every vCPU thread exists, as a
        # tracer attaching to running VMs would; bounded, in case one died.
        f"n=0; until {reports}; do",
        "  n=$((n + 1)); [ $n -lt 600 ] || exit 90; sleep 0.1",
        "done",
        f"echo {shlex.quote(TRIGGER)} > {event}/trigger",
    ]
    # Appended: a second trigger on an event must not replace the first.
    lines += [f"echo {shlex.quote(detail_trigger(keys, fixed))} >> "
              f"{EVENTS}/{ev}/trigger" for ev, keys, fixed in DETAIL_TRIGGERS]
    lines += [f"touch {go}", "set +e", "status=0"]
    # Every guest's status counts, and the histograms are kept either way.
    lines += [f"wait $pid_{name} || status=$?" for name in guests]
    lines += [f"cat {event}/hist > {outdir}/hist"]
    lines += [f"cat {EVENTS}/{ev}/hist > {outdir}/{ev}.hist"
              for ev in sorted({ev for ev, _, _ in DETAIL_TRIGGERS})]
    lines += [f"cat {EVENTS}/{ev}/format > {outdir}/{ev}.format"
              for ev in sorted({ev for ev, _, _ in DETAIL_TRIGGERS})]
    lines += ["exit $status"]
    return "\n".join(lines)


def detail_trigger(keys, fixed):
    """A hist trigger counting per vCPU thread and `keys`, filtered."""
    text = "hist:keys=" + ",".join(("common_pid",) + keys)
    if fixed:
        text += " if " + " && ".join(f"{k}=={v}" for k, v in fixed.items())
    return text


def parse_hist(text):
    """{tid: {exit_reason: count}} and {tid: comm} from the hist file."""
    counts, comms = {}, {}
    for m in HIST_LINE.finditer(text):
        tid = int(m["tid"])
        counts.setdefault(tid, {})[int(m["reason"])] = int(m["count"])
        comms[tid] = m["comm"]
    return counts, comms


HIST_ENTRY = re.compile(r"^\{ (?P<key>.*?) \} hitcount:\s*(?P<count>\d+)$",
                        re.M)


def parse_hists(text):
    """Every histogram of one event's hist file: [(trigger, rows)], rows
    [({field: value}, count)] (plain keys print as decimal numbers)."""
    hists = []
    for block in text.split("# trigger info: ")[1:]:
        trigger = block.split("\n", 1)[0].split(" [active]")[0].strip()
        if not trigger.startswith("hist:keys=common_pid,"):
            continue            # not a DETAIL_TRIGGERS one (execname keys)
        rows = []
        for m in HIST_ENTRY.finditer(block):
            fields = {}
            for part in m["key"].split(","):
                name, value = part.split(":", 1)
                fields[name.strip()] = int(value)
            rows.append((fields, int(m["count"])))
        hists.append((trigger, rows))
    return hists


def trigger_rows(hists, event, keys, fixed):
    """The rows of the histogram that DETAIL_TRIGGERS set with these."""
    head = detail_trigger(keys, ()) + ":"
    tail = detail_trigger((), fixed).removeprefix("hist:keys=common_pid")
    for trigger, rows in hists[event]:
        if trigger.startswith(head) and (not fixed or trigger.endswith(tail)):
            return rows
    raise AssertionError(f"no histogram {head}...{tail} in {event}")


def kernel_count(hists, event, tid, want):
    """What the kernel counted for thread `tid` where the fields of `want`
    hold, from a trigger on `event` that fixes all of them."""
    for ev, keys, fixed in DETAIL_TRIGGERS:
        if ev == event and set(want) <= set(keys) | set(fixed) and \
                all(want.get(k) == v for k, v in fixed.items()):
            rows = trigger_rows(hists, event, keys, fixed)
            return sum(n for fields, n in rows
                       if fields["common_pid"] == tid and
                       all(fields[k] == want[k] for k in want if k in keys))
    raise AssertionError(f"no trigger on {event} counts {sorted(want)}")


def command(outdir):
    # From a file: vng hands the command over on the kernel command line,
    # which a script this long would overflow (the lab then never boots).
    script = os.path.join(outdir, "lab.sh")
    with open(script, "w") as f:
        f.write(lab_script(outdir) + "\n")
    return ["/bin/sh", script]


SCENARIO = Scenario("guests", command=command, timeout=600, lab="amd2",
                    env="KVMEXIT_LAB_GUESTS")


@pytest.fixture(scope="module")
def lab_dir(lab_runs):
    return pathlib.Path(lab_runs.outdir(SCENARIO))


@pytest.fixture(scope="module")
def lab_run(lab_dir):
    reports = {}
    for name in list(GUESTS) + ["detail"]:
        with open(lab_dir / f"{name}.json") as f:
            reports[name] = json.load(f)
    return reports, (lab_dir / "hist").read_text()


@pytest.fixture(scope="module")
def detail(lab_run, lab_dir):
    """The detail guest's report and {event: parsed histograms}."""
    reports, _ = lab_run
    hists = {ev: parse_hists((lab_dir / f"{ev}.hist").read_text())
             for ev in {ev for ev, _, _ in DETAIL_TRIGGERS}}
    return reports["detail"], hists


@pytest.mark.parametrize("name", sorted(GUESTS))
def test_exact_exits_per_vcpu_thread(lab_run, name):
    reports, hist = lab_run
    counts, comms = parse_hist(hist)
    report = reports[name]
    assert report["state"] == "done"
    for vcpu in report["vcpus"]:
        i, tid = vcpu["index"], vcpu["tid"]
        io, cr4 = GUESTS[name]["io"][i], GUESTS[name]["cr4"][i]
        got = counts.get(tid, {})
        where = f"guest {name} vCPU {i} (tid {tid}): {got}\n{hist}"
        assert vcpu["errors"] == [], where
        assert vcpu["user_exits"].get("IO", 0) == io, where
        assert comms.get(tid) == f"CPU {i}/KVM", where
        assert got.get(IOIO, 0) == io, where
        assert got.get(READ_CR4, 0) == cr4, where
        assert got.get(WRITE_CR4, 0) == cr4, where
        assert got.get(HLT, 0) == 1, where


def test_only_vcpu_threads_exit(lab_run):
    reports, hist = lab_run
    counts, _ = parse_hist(hist)
    vcpu_tids = {v["tid"] for r in reports.values() for v in r["vcpus"]}
    assert set(counts) == vcpu_tids, hist


DETAIL_EVENTS = ["kvm_exit", "kvm_pio", "kvm_msr", "kvm_mmio", "kvm_hypercall",
                 "kvm_cpuid", "kvm_inj_exception", "kvm_page_fault",
                 "kvm_userspace_exit"]


@pytest.mark.parametrize("event", DETAIL_EVENTS)
def test_detail_counts_match_the_kernel(detail, event):
    """Every count the guest promises for `event` is the kernel's count."""
    report, hists = detail
    assert report["state"] == "done"
    checked = 0
    for vcpu in report["vcpus"]:
        for entry in vcpu["expected_events"].get(event, []):
            want = {k: v for k, v in entry.items() if k != "count"}
            if event == "kvm_userspace_exit":
                want["errno"] = 0
            got = kernel_count(hists, event, vcpu["tid"], want)
            assert got == entry["count"], \
                f"vCPU {vcpu['index']} {event} {want}: kernel {got}, " \
                f"expected {entry['count']}\n{hists[event]}"
            checked += 1
    # Each of these events has expectations: a test that checks none passes
    # vacuously.
    assert checked >= 2


def test_detail_expectations_are_the_programs(detail):
    """The report's expectations are the numbers the test asked for."""
    report, _ = detail
    assert report["isa"] == "svm"
    v0, v1 = report["vcpus"]
    pio = {(e["port"], e["rw"], e["size"]): e["count"]
           for e in v0["expected_events"]["kvm_pio"]}
    assert pio == {(0x70, 1, 1): 11, (0x71, 1, 2): 12, (0x72, 1, 4): 13,
                   (0x73, 0, 1): 14, (0x74, 0, 2): 15, (0x75, 0, 4): 16}
    msr = {(e["ecx"], e["write"]): e["count"]
           for e in v0["expected_events"]["kvm_msr"]}
    assert msr == {(0x1b, 0): 21, (0x1b, 1): 22, (0x1a0, 0): 23,
                   (0x1a0, 1): 24, (0x6e0, 0): 25, (0x6e0, 1): 26}
    mmio = {(e["type"], e["gpa"]): e["count"]
            for e in v1["expected_events"]["kvm_mmio"]}
    assert mmio == {(2, 0xe0000000): 6, (0, 0xe0000ff0): 3,
                    (1, 0xe0000ff0): 3}
    user = {e["reason"]: e["count"]
            for e in v1["expected_events"]["kvm_userspace_exit"]}
    # IO, HLT, MMIO
    assert user == {2: 7, 5: 1, 6: 9}
    inj = {(e["exception"], e["reinjected"]): e["count"]
           for e in v0["expected_events"]["kvm_inj_exception"]}
    assert inj == {(6, 0): 62}


def test_detail_user_space_saw_each_exit(detail):
    report, _ = detail
    for vcpu in report["vcpus"]:
        assert vcpu["errors"] == [], vcpu
        assert vcpu["user_detail"] == vcpu["expected_user"], vcpu
    v0 = report["vcpus"][0]
    assert v0["user_detail"][f"rdmsr:{USER_MSR:#x}"] == 27
    assert v0["user_detail"][f"wrmsr:{USER_MSR:#x}"] == 28
    assert v0["user_detail"]["mmio-read:0xd0002008/1"] == 55


def test_detail_no_other_exits(detail):
    """Besides the promised exits only noise: host interrupts, and NPFs on
    the guest's own RAM pages."""
    report, hists = detail
    noise = report["exit_codes"]["INTR"]
    npf = report["exit_codes"]["NPF"]
    rows = next(rows for t, rows in hists["kvm_exit"] if "info2" in t)
    for vcpu in report["vcpus"]:
        promised = {e["exit_reason"]
                    for e in vcpu["expected_events"]["kvm_exit"]}
        for fields, n in rows:
            if fields["common_pid"] != vcpu["tid"]:
                continue
            reason = fields["exit_reason"]
            if reason == noise or reason == npf and fields["info2"] < RAM_END:
                continue
            assert reason in promised, (vcpu["index"], fields, n)
        users = {f["reason"] for f, _ in next(
            rows for _, rows in hists["kvm_userspace_exit"])
            if f["common_pid"] == vcpu["tid"] and f["errno"] == 0}
        assert users == {e["reason"] for e in
                         vcpu["expected_events"]["kvm_userspace_exit"]}
