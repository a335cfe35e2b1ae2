"""A PID reused by a new VM: the new VM starts from zero under its own
name, in the text, JSON and CSV reports and in the exporter's series, even
while the old VM's thread (same TID: both are their process's leader)
still holds a CPU's cache slot and its retired counts are kept.

Real processes (tests/helpers/vmm.py) with chosen names and command lines
fire kvm_exit events through BPF_PROG_TEST_RUN into kvmexit's program
(raw-old, SVM layout, with the kernel's VM names); the new VM gets the old
one's PID from the kernel itself (clone3's set_tid).  Runs as root on the
real kernel, never skipped (see conftest.py)."""

import io
import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from helpers.vmm import Vmm
from test_names import exit_keeps_memory
import kvmexit

SVM = kvmexit.ISA_SVM
IOIO, HLT = 0x7b, 0x78
ALL = kvmexit.Selection("all threads", "all")


@pytest.fixture
def loaded(bcc, cpus_0_1):
    program = kvmexit.Program(kvmexit.Probe("raw-old", "test"), ALL, 64,
                              kvmexit.SVM_LAYOUT, frozenset({"names"}))
    b = kvmexit.load_program(program)
    b.fd = b.load_func(b"raw_kvm_exit", bcc.BPF.RAW_TRACEPOINT).fd
    yield b, kvmexit.ThreadTables(b, program, kvmexit.possible_cpus())
    b.cleanup()


def old_vm_gone(b, tables, ledger):
    """A VM that exits to KVM on CPU 0 (its thread then holds that CPU's
    cache slot), is seen by a tick, ends and is retired; its PID."""
    old = Vmm.start(b.fd, "qemu-system-x86",
                    ["-name", "guest=old-vm,debug-threads=on"])
    old.exits(0, IOIO, 4)
    ledger.retire(tables)
    old.end()
    ledger.retire(tables)
    assert ledger.read(tables).counts == {(old.pid, old.pid, SVM, IOIO): 4}
    assert ledger.idents[old.pid].text() == "qemu-system-x86 guest=old-vm"
    assert ledger.held == {old.pid << 32 | old.pid: {(SVM, IOIO): 4}}
    return old.pid


def text_report(ledger, snap):
    out = io.StringIO()
    report = kvmexit.TextReport(ALL, kvmexit.ReasonNames(),
                                kvmexit.ReportOptions(comm=True), out=out)
    report.idents = ledger.idents
    report.report(snap, 0, 1)
    return out.getvalue()


def record_report(ledger, snap, **opts):
    out = io.StringIO()
    report = kvmexit.RecordReport(ALL, kvmexit.ReasonNames(),
                                  kvmexit.Probe("raw-old", "test"),
                                  kvmexit.ReportOptions(**opts), out=out)
    report.idents = ledger.idents
    report.report(snap, 0, 1)
    return out.getvalue()


def exits_served(b, tables, ledger):
    """{(vm, pid, reason): value} of kvm_exits_total in one scrape."""
    exporter = kvmexit.Exporter(
        lambda: ledger.read(tables), kvmexit.ReasonNames(), ALL,
        kvmexit.VmNames(idents=ledger.idents), False,
        {"version": kvmexit.VERSION, "probe": "raw-old"}, kvmexit.BpfSelf(b))
    registry = CollectorRegistry()
    registry.register(exporter)
    text = generate_latest(registry).decode()
    return {(s.labels["vm"], s.labels["pid"], s.labels["reason"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "kvm_exits_total"}


def test_a_reused_pid_starts_from_zero_under_its_own_name(loaded):
    b, tables = loaded
    ledger = kvmexit.Ledger()
    pid = old_vm_gone(b, tables, ledger)
    assert exits_served(b, tables, ledger) == {
        ("old-vm", str(pid), "IOIO"): 4}
    new = Vmm.start(b.fd, "qemu-kvm", ["-name", "guest=new-vm"], pid=pid)
    # On the old thread's CPU: its cache slot counts on, as the same TID.
    new.exits(0, HLT, 2)
    # A scrape before the next tick already serves the new VM alone.
    assert exits_served(b, tables, ledger) == {
        ("new-vm", str(pid), "HLT"): 2}
    ledger.retire(tables)
    snap = ledger.read(tables)
    assert snap.counts == {(pid, pid, SVM, HLT): 2}
    assert text_report(ledger, snap).splitlines()[1:] == [
        "%-8u %-32s %-8u %-35s %-8u" % (pid, "qemu-kvm guest=new-vm", pid,
                                        "HLT", 2)]
    rows = json.loads(record_report(ledger, snap, json=True))["rows"]
    assert [(r["pid"], r["tid"], r["comm"], r["name"], r["count"])
            for r in rows] == [(pid, pid, "qemu-kvm guest=new-vm", "HLT", 2)]
    assert record_report(ledger, snap, csv=True).splitlines()[1:] == [
        "1.000000,%d,%d,,qemu-kvm guest=new-vm,svm,120,HLT,2" % (pid, pid)]
    new.end()


def test_a_short_vm_on_a_reused_pid_is_named_as_it_ends(loaded):
    """It starts and ends between two ticks, and its thread continues the
    old one's table entry (same TID), so its first exit does not name it:
    its end does, with its start time, so the old VM's counts and name go
    at the next tick."""
    b, tables = loaded
    ledger = kvmexit.Ledger()
    pid = old_vm_gone(b, tables, ledger)
    new = Vmm.start(b.fd, "qemu-kvm", ["-name", "guest=new-vm"], pid=pid)
    new.exits(1, HLT, 2)
    new.end()
    snap = ledger.read(tables)
    assert snap.counts == {(pid, pid, SVM, HLT): 2}
    name = "qemu-kvm guest=new-vm" if exit_keeps_memory() else "qemu-kvm"
    assert ledger.idents[pid].text() == name
    assert text_report(ledger, snap).splitlines()[1:] == [
        "%-8u %-32s %-8u %-35s %-8u" % (pid, name, pid, "HLT", 2)]
    assert exits_served(b, tables, ledger) == {
        (ledger.idents[pid].label(), str(pid), "HLT"): 2}
