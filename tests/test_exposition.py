"""kvm_exits_total's and --detail's series, written by
kvmexit.exposition(): byte for byte what prometheus_client writes for the
same collected families, in both formats, for VM names that need
escaping and counts of every size.

The families are collected once from kvmexit.Exporter on a chosen snapshot
(data: the VM names and counts a real host could have) and handed to both
writers, so that both see the same state (the collect duration and the
process metrics change from one collect to the next)."""

import gzip
import io
import random

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.utils import floatToGoString

import kvmexit

SVM, VMX = kvmexit.ISA_SVM, kvmexit.ISA_VMX
MSR = 0x7c
# Named MSRs and unnamed ones: 20 keys.
MSRS = (0x10, 0x1b, 0x48) + tuple(range(0xc0000080, 0xc0000091))
ALL = kvmexit.Selection("all threads", "all")
# VM names as QEMU's -name guest= can give them.
NAMES = {100: 'plain', 200: 'quote"d', 300: 'back\\slash',
         400: 'new\nline', 500: '\\"\n\\\\n mixed', 600: 'ünïcödé'}
# Counts around every edge of the value format: the exponent from a
# million on, the float's rounding beyond 2**53, Python's own exponent
# from 1e16 on, the counter's wrap at 2**64.
EDGES = (0, 1, 999999, 10 ** 6, 10 ** 6 + 1, 1234567, 10 ** 7, 2 ** 32,
         2 ** 53 - 1, 2 ** 53, 2 ** 53 + 1, 10 ** 15, 10 ** 16 - 1,
         10 ** 16, 10 ** 16 + 1, 123456789012345678, 10 ** 19,
         2 ** 64 - 1)


def counts_text_cases():
    rng = random.Random(18)
    return list(EDGES) + [rng.randrange(10 ** k) for k in range(1, 21)
                          for _ in range(50)]


def test_count_text_is_prometheus_clients_float_format():
    for n in counts_text_cases():
        assert kvmexit.count_text(n) == floatToGoString(n), n


def test_label_values_are_escaped_as_prometheus_client_does():
    assert kvmexit.label_escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def snapshot():
    """Threads of the VMs above, each on its vCPU, exiting for SVM and VMX
    reasons with counts from EDGES; one thread with no known vCPU."""
    counts, vcpu_ids, rng = {}, {}, random.Random(5)
    for tgid in NAMES:
        for vcpu in range(3):
            tid = tgid + vcpu
            vcpu_ids[(tgid, tid)] = vcpu
            for code in (0x7b, 0x78, 0x60, 0x400):
                counts[(tgid, tid, SVM, code)] = rng.choice(EDGES)
            counts[(tgid, tid, VMX, 30)] = rng.randrange(2 ** 64)
    counts[(100, 199, SVM, 0x7b)] = 7
    vcpu_ids[(100, 199)] = kvmexit.VCPU_ID_UNKNOWN
    lost = [3] * len(kvmexit.LOST)
    return kvmexit.Snapshot(counts, vcpu_ids, lost, detail=details(counts),
                            detail_lost=2 ** 60)


def details(counts):
    """--detail's: each thread's MSR exits over 20 MSRs, read and written,
    more than the 16 sub-keys served per VM, vCPU and reason."""
    msr, rng = kvmexit.DETAIL_KINDS["msr"], random.Random(7)
    return {(tgid, tid, SVM, MSR, msr, key, write): rng.choice(EDGES)
            for tgid, tid, _, _ in counts
            for key in MSRS
            for write in (0, 1) if (key + write + tid) % 3}


def collected(labels):
    """The families one scrape of an Exporter (and the process metrics
    listen() registers) yields, collected once."""
    idents = {tgid: kvmexit.Ident("qemu-system-x86", name)
              for tgid, name in NAMES.items()}
    exporter = kvmexit.Exporter(
        snapshot, kvmexit.ReasonNames(), ALL,
        kvmexit.VmNames(idents=idents), False,
        {"version": kvmexit.VERSION, "probe": "raw-old"}, labels=labels,
        detail=True)
    # As listen() registers them: prometheus_client's families before
    # kvm_exits_total and kvmexit's small ones after it.
    registry = CollectorRegistry()
    prometheus_client.ProcessCollector(registry=registry)
    registry.register(exporter)
    return kvmexit.Families(list(registry.collect()))


def exits_family(families):
    return next(f for f in families.families if f.name == "kvm_exits")


LABEL_CHOICES = (kvmexit.DEFAULT_LABELS, ("vm", "vcpu", "reason"),
                 ("isa", "reason"), ("reason",))


@pytest.mark.parametrize("labels", LABEL_CHOICES)
def test_text_format_is_byte_for_byte_prometheus_clients(labels):
    families = collected(labels)
    ours = kvmexit.exposition(families)
    assert ours == generate_latest(families)
    # It did write the series, with every escape and an exponent.
    for family in families.families:
        assert isinstance(family.samples, kvmexit.SeriesSamples) == (
            family.name in ("kvm_exits", "kvm_exit_details",
                            "kvm_exit_details_dropped"))
        assert len(family.samples) > 0, family.name
    assert ours.startswith(b"# HELP process_")
    if "vm" in labels:
        assert b'vm="back\\\\slash"' in ours
        assert b'vm="new\\nline"' in ours
        assert b'vm="quote\\"d"' in ours
    assert b"e+0" in ours and b"e+19" in ours


@pytest.mark.parametrize("labels", LABEL_CHOICES)
def test_openmetrics_is_byte_for_byte_prometheus_clients(labels):
    families = collected(labels)
    ours = kvmexit.exposition(families, openmetrics=True)
    assert ours == openmetrics.generate_latest(families)
    assert ours.endswith(b"\n# EOF\n") and ours.count(b"# EOF") == 1


def test_series_are_the_samples_prometheus_client_would_read():
    families = collected(kvmexit.DEFAULT_LABELS)
    exits = exits_family(families)
    assert len(exits.samples) == len(NAMES) * 3 * 5 + 1
    sample = next(s for s in exits.samples
                  if s.labels["pid"] == "100" and s.labels["vcpu"] ==
                  "unknown")
    assert sample.name == "kvm_exits_total"
    assert sample.labels == {"vm": "plain", "pid": "100", "vcpu": "unknown",
                             "isa": "svm", "reason": "IOIO"}
    assert sample.value == 7


def wsgi_get(app, accept=None, encoding=None, query=""):
    environ = {"PATH_INFO": "/metrics", "QUERY_STRING": query,
               "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    if accept:
        environ["HTTP_ACCEPT"] = accept
    if encoding:
        environ["HTTP_ACCEPT_ENCODING"] = encoding
    answer = {}

    def start_response(status, headers):
        answer["status"], answer["headers"] = status, dict(headers)
    body = b"".join(app(environ, start_response))
    return answer["status"], answer["headers"], body


def test_the_app_chooses_the_format_by_accept_and_gzips_as_asked():
    families = collected(kvmexit.DEFAULT_LABELS)
    app = kvmexit.metrics_app(families)
    status, headers, body = wsgi_get(app)
    assert status == "200 OK"
    assert headers == {"Content-Type":
                       "text/plain; version=0.0.4; charset=utf-8"}
    assert body == generate_latest(families)
    status, headers, body = wsgi_get(
        app, accept="text/plain;q=0.5, application/openmetrics-text; "
        "version=0.0.1", encoding="deflate, gzip;q=1.0")
    assert headers == {"Content-Type": "application/openmetrics-text; "
                       "version=0.0.1; charset=utf-8",
                       "Content-Encoding": "gzip"}
    assert gzip.decompress(body) == openmetrics.generate_latest(families)


def test_a_name_filter_is_served_by_prometheus_client():
    registry = CollectorRegistry()
    registry.register(kvmexit.Exporter(
        snapshot, kvmexit.ReasonNames(), ALL, kvmexit.VmNames(
            idents={tgid: kvmexit.Ident("qemu", name)
                    for tgid, name in NAMES.items()}), False,
        {"version": kvmexit.VERSION}))
    _, _, body = wsgi_get(kvmexit.metrics_app(registry),
                          query="name[]=kvm_exits_total")
    assert body.startswith(b"# HELP kvm_exits_total VM exits by VM, vCPU "
                           b"and exit reason\n# TYPE kvm_exits_total "
                           b"counter\nkvm_exits_total{isa=")
    assert body.count(b"\n") == 2 + len(NAMES) * 3 * 5 + 1
