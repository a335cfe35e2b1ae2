"""A real Prometheus server on loopback, for tests that check kvmexit's
exporter through PromQL.  Stdlib only; runs inside the lab (and on any host
with Debian's `prometheus` package, 2.42).

    server = Prometheus(workdir, targets=["127.0.0.1:9417"])
    server.start()                   # returns once /-/ready answers 200
    server.wait_for_scrape(after=t)  # every target scraped after time t
    server.query('sum by (vm) (kvm_exits_total)')   # the result vector
    server.api("alerts")             # with rules=[FILE]: the active alerts
    server.stop()

The server scrapes every second, so that a test waits seconds, not
minutes.  Nothing outside `workdir` is written: the config, the TSDB and
the server's log are kept there.
"""

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

BINARY = "/usr/bin/prometheus"
JOB = "kvmexit"
# Under the lab's emulator the server takes ~11 s to answer.
START_TIMEOUT = 120
STOP_TIMEOUT = 30

CONFIG = """\
global:
  scrape_interval: {interval}
  scrape_timeout: {timeout}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: {job}
    static_configs:
      - targets: [{targets}]
"""


class PrometheusError(Exception):
    pass


class Prometheus:
    def __init__(self, workdir, targets, port=9090, interval="1s",
                 timeout="1s", binary=BINARY, rules=()):
        self.workdir = workdir
        self.rules = list(rules)
        self.targets = list(targets)
        self.address = "127.0.0.1:%d" % port
        self.interval, self.timeout = interval, timeout
        self.binary = binary
        self.proc = None
        self.log = os.path.join(workdir, "prometheus.log")

    def config(self):
        config = CONFIG.format(interval=self.interval, timeout=self.timeout,
                               job=JOB, targets=", ".join(
                                   json.dumps(t) for t in self.targets))
        if self.rules:
            config += "rule_files:\n" + "".join(
                "  - %s\n" % json.dumps(path) for path in self.rules)
        return config

    def start(self):
        os.makedirs(self.workdir, exist_ok=True)
        config = os.path.join(self.workdir, "prometheus.yml")
        with open(config, "w") as f:
            f.write(self.config())
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--config.file=" + config,
                 "--storage.tsdb.path=" + os.path.join(self.workdir, "tsdb"),
                 "--web.listen-address=" + self.address],
                stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        self.wait_ready()
        return self

    def url(self, path, **params):
        query = "?" + urllib.parse.urlencode(params) if params else ""
        return "http://%s%s%s" % (self.address, path, query)

    def get(self, path, **params):
        with urllib.request.urlopen(self.url(path, **params),
                                    timeout=10) as r:
            return r.status, r.read().decode()

    def wait_ready(self, timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError("prometheus exited with status %d: %s"
                                      % (self.proc.returncode,
                                         self.log_tail()))
            try:
                if self.get("/-/ready")[0] == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.25)
        raise PrometheusError("prometheus not ready after %d s: %s"
                              % (timeout, self.log_tail()))

    def log_tail(self, chars=2000):
        try:
            with open(self.log) as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def api(self, path, **params):
        """The `data` of an /api/v1 answer; raises on any error status."""
        try:
            _, body = self.get("/api/v1/" + path, **params)
        except urllib.error.HTTPError as e:
            body = e.read().decode()
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise PrometheusError("%s %s: %s" % (path, params,
                                                 answer.get("error", body)))
        return answer["data"]

    def query(self, promql, at=None):
        """An instant query: [(labels dict, float value)]."""
        params = {"query": promql}
        if at is not None:
            params["time"] = "%.3f" % at
        data = self.api("query", **params)
        if data["resultType"] != "vector":
            raise PrometheusError("%s: a %s, not a vector"
                                  % (promql, data["resultType"]))
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def targets_health(self):
        """{target address: (health, last scrape as Unix time or None,
        last error)}."""
        found = {}
        for t in self.api("targets")["activeTargets"]:
            found[t["labels"]["instance"]] = (
                t["health"], parse_rfc3339(t.get("lastScrape")),
                t.get("lastError", ""))
        return found

    def wait_for_scrape(self, after, timeout=60, healthy=True):
        """Wait until every target was scraped at a time after `after` (a
        Unix time) -- with success if `healthy`."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.targets_health()
            if states and all(last is not None and last > after and
                              (health == "up" or not healthy)
                              for health, last, _ in states.values()):
                return states
            if time.monotonic() > deadline:
                raise PrometheusError("no %sscrape of every target after "
                                      "%.3f within %d s: %s"
                                      % ("healthy " if healthy else "",
                                         after, timeout, states))
            time.sleep(0.25)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def parse_rfc3339(text):
    """Unix time of Prometheus' RFC 3339 timestamps (nanoseconds, 'Z' or an
    offset); None for the zero time of a target never scraped."""
    if not text or text.startswith("0001-"):
        return None
    import datetime
    date, _, rest = text.partition("T")
    clock, zone = rest, "+00:00"
    for sign in ("Z", "+", "-"):
        if sign in rest:
            clock, mark, tail = rest.partition(sign)
            zone = "+00:00" if sign == "Z" else mark + tail
            break
    whole, _, frac = clock.partition(".")
    stamp = datetime.datetime.fromisoformat(
        "%sT%s.%s%s" % (date, whole, (frac + "000000")[:6], zone))
    return stamp.timestamp()
