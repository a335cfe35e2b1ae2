"""--web.config.file: TLS and basic auth in the exporter-toolkit's format.

Certificates are made here with the openssl command (a CA, a server
certificate for 127.0.0.1, a client certificate, and a client certificate
of another CA); passwords are real bcrypt hashes.  The server is kvmexit's
own (listen()), with prometheus_client's process metrics in its registry,
reached over real TLS handshakes on loopback.  Last, the command runs as
the service would, scraped by a real Prometheus over TLS with basic auth.

Runs as root on the real kernel, never skipped (see conftest.py)."""

import base64
import http.client
import json
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
import urllib.request

import bcrypt
import pytest

import kvmexit
from helpers import SCRIPT, SYSTEM_PYTHON

PASSWORD = "s3cret pass"


def openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", "/CN=%s" % name, "-keyout", name + ".key",
            "-out", name + ".crt", cwd=d)


def make_cert(d, name, ca, ext):
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=%s" % name,
            "-keyout", name + ".key", "-out", name + ".csr", cwd=d)
    (d / (name + ".ext")).write_text(ext)
    openssl("x509", "-req", "-in", name + ".csr", "-CA", ca + ".crt",
            "-CAkey", ca + ".key", "-CAcreateserial", "-days", "2",
            "-extfile", name + ".ext", "-out", name + ".crt", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue")
    make_cert(d, "server", "ca", "subjectAltName=IP:127.0.0.1\n"
              "extendedKeyUsage=serverAuth\n")
    make_cert(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    make_cert(d, "intruder", "rogue", "extendedKeyUsage=clientAuth\n")
    return d


@pytest.fixture(scope="module")
def hashed():
    return bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(d, text):
    path = d / "web.yml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


@pytest.fixture
def serve_with(pki):
    """Start kvmexit's server with a web configuration text; its port."""
    servers = []

    def start(text, **kw):
        web = kvmexit.load_web_config(write_config(pki, text))
        port = free_port()
        server = kvmexit.listen(("127.0.0.1", port), web, **kw)
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop()


def client_context(pki, cert=None, **versions):
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    for key, value in versions.items():
        setattr(context, key, value)
    if cert:
        context.load_cert_chain(str(pki / (cert + ".crt")),
                                str(pki / (cert + ".key")))
    return context


def get(port, context=None, user=None, password=None, path="/metrics"):
    """(status, headers, body) of one request; https with a context."""
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                           context=context)
    headers = {}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(
            ("%s:%s" % (user, password)).encode()).decode()
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        conn.close()


TLS = """tls_server_config:
  cert_file: server.crt
  key_file: server.key
"""


#
# TLS
#
def test_tls_serves_metrics_to_a_client_that_trusts_the_ca(serve_with, pki):
    port = serve_with(TLS)
    status, _, body = get(port, client_context(pki))
    assert status == 200
    assert "\nprocess_resident_memory_bytes " in body


def test_plain_http_to_the_tls_port_is_refused_and_serving_goes_on(
        serve_with, pki):
    port = serve_with(TLS)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        get(port)
    status, _, _ = get(port, client_context(pki))
    assert status == 200


def test_a_client_that_does_not_trust_the_certificate_fails(serve_with,
                                                            pki):
    port = serve_with(TLS)
    other = ssl.create_default_context(cafile=str(pki / "rogue.crt"))
    with pytest.raises(ssl.SSLCertVerificationError):
        get(port, other)


def test_min_version_tls13_refuses_a_tls12_client(serve_with, pki):
    port = serve_with(TLS + "  min_version: TLS13\n")
    with pytest.raises(ssl.SSLError):
        get(port, client_context(pki,
                                 maximum_version=ssl.TLSVersion.TLSv1_2))
    assert get(port, client_context(pki))[0] == 200


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_the_default_minimum_is_tls12(serve_with, pki):
    port = serve_with(TLS)
    with pytest.raises(ssl.SSLError):
        get(port, client_context(pki,
                                 minimum_version=ssl.TLSVersion.TLSv1_1,
                                 maximum_version=ssl.TLSVersion.TLSv1_1))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        tls = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
        with tls.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.version() == "TLSv1.2"


def outcome(port, context):
    try:
        return get(port, context)[0]
    except (ssl.SSLError, ConnectionError):
        return "refused"


@pytest.mark.parametrize("auth, none, intruder", [
    ("RequireAndVerifyClientCert", "refused", "refused"),
    ("VerifyClientCertIfGiven", 200, "refused"),
])
def test_client_certificates(serve_with, pki, auth, none, intruder):
    port = serve_with(TLS + "  client_auth_type: %s\n"
                      "  client_ca_file: ca.crt\n" % auth)
    assert outcome(port, client_context(pki)) == none
    assert outcome(port, client_context(pki, "intruder")) == intruder
    assert outcome(port, client_context(pki, "client")) == 200


#
# Basic auth
#
def test_basic_auth(serve_with, pki, hashed):
    port = serve_with(TLS + "basic_auth_users:\n  prom: %s\n" % hashed)
    tls = client_context(pki)
    status, headers, body = get(port, tls)
    assert (status, headers["WWW-Authenticate"], body) == \
        (401, "Basic", "Unauthorized\n")
    assert get(port, tls, "prom", "wrong")[0] == 401
    assert get(port, tls, "nobody", PASSWORD)[0] == 401
    status, _, body = get(port, tls, "prom", PASSWORD)
    assert status == 200 and "process_resident_memory_bytes" in body


def test_htpasswd_style_2y_hash(serve_with, pki, hashed):
    # htpasswd -B writes $2y$, the toolkit's documented way to make one.
    port = serve_with("basic_auth_users:\n  prom: '$2y$%s'\n" % hashed[4:])
    assert get(port, None, "prom", PASSWORD)[0] == 200
    assert get(port, None, "prom", PASSWORD + "x")[0] == 401


def test_headers_from_http_server_config(serve_with):
    port = serve_with("http_server_config:\n  headers:\n"
                      "    X-Frame-Options: deny\n")
    assert get(port)[1]["X-Frame-Options"] == "deny"


#
# Bad files: one line each
#
@pytest.mark.parametrize("text, problem", [
    ("tls_server_config: [\n", "not YAML (line 2, column 1): expected the "
     "node content, but found '<stream end>'"),
    (b"\xff\n", "not YAML: 'utf-8' codec can't decode byte 0xff in position"
     " 0: invalid start byte"),
    ("tls_server_configs: {}\n", "unknown key 'tls_server_configs'"),
    ("tls_server_config:\n  certfile: x\n",
     "unknown key tls_server_config.certfile"),
    ("- 1\n", "the file must be a mapping of names"),
    ("tls_server_config:\n  cert_file: server.crt\n",
     "tls_server_config: missing key_file"),
    ("tls_server_config:\n  cert_file: nothere.crt\n  key_file: server.key"
     "\n", "cannot load cert_file {dir}/nothere.crt and key_file "
     "{dir}/server.key: No such file or directory"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: client.key"
     "\n", "cannot load cert_file {dir}/server.crt and key_file "
     "{dir}/client.key: key values mismatch"),
    (TLS + "  min_version: TLS14\n",
     "unknown TLS version 'TLS14' (TLS10 to TLS13)"),
    (TLS + "  min_version: TLS13\n  max_version: TLS12\n",
     "min_version TLS13 is above max_version TLS12"),
    (TLS + "  client_auth_type: Always\n", "invalid client_auth_type "
     "'Always'"),
    (TLS + "  client_ca_file: ca.crt\n", "client_ca_file is set but "
     "client_auth_type does not verify client certificates"),
    (TLS + "  client_auth_type: RequireAnyClientCert\n",
     "client_auth_type RequireAnyClientCert (any certificate, unverified)"
     " is not possible with Python's ssl: use RequireAndVerifyClientCert "
     "with client_ca_file"),
    (TLS + "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
     "tls_server_config.cipher_suites is not supported: OpenSSL chooses "
     "the suites (Go's names do not apply)"),
    ("basic_auth_users:\n  prom: plain\n",
     "basic_auth_users: the password of 'prom' is not a bcrypt hash"),
    ("http_server_config:\n  headers:\n    Server: x\n",
     "http_server_config.headers: 'Server' is not one of "
     "Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options,"
     " X-XSS-Protection, Content-Security-Policy"),
])
def test_a_bad_file_is_one_line(pki, text, problem):
    path = write_config(pki, text)
    with pytest.raises(kvmexit.Error) as exc:
        kvmexit.load_web_config(path)
    assert str(exc.value) == "--web.config.file %s: %s" % (
        path, problem.format(path=path, dir=pki))


def test_the_command_tells_a_bad_file_in_one_line(pki):
    path = write_config(pki, "basic_auth_users: 3\n")
    result = subprocess.run([SYSTEM_PYTHON, SCRIPT, "--prometheus", "9417",
                             "--web.config.file", path],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "kvmexit: --web.config.file %s: " \
        "basic_auth_users must be a mapping of names\n" % path


def test_an_empty_file_is_plain_http_without_auth(serve_with):
    assert get(serve_with(""))[0] == 200


#
# A real Prometheus scrapes the command over TLS with basic auth
#
PROMETHEUS_CONFIG = """global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
"""
JOB = """  - job_name: {name}
    scheme: https
    tls_config:
      ca_file: {pki}/ca.crt
    basic_auth:
      username: prom
      password: "{password}"
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def query(port, expr):
    url = "http://127.0.0.1:%d/api/v1/query?query=%s" % (
        port, urllib.parse.quote(expr))
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["data"]["result"]


def wait_for_query(port, expr, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = query(port, expr)
            if result:
                return result
        except OSError:
            pass            # not up yet
        time.sleep(0.5)
    raise AssertionError("no result for %s" % expr)


def test_a_real_prometheus_scrapes_over_tls_with_basic_auth(bcc, pki,
                                                            hashed,
                                                            tmp_path):
    port, prom_port = free_port(), free_port()
    config = write_config(pki, TLS + "basic_auth_users:\n  prom: %s\n"
                          % hashed)
    tool = subprocess.Popen([SYSTEM_PYTHON, SCRIPT, "--prometheus",
                             "127.0.0.1:%d" % port, "--web.config.file",
                             config], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    (tmp_path / "prometheus.yml").write_text(
        PROMETHEUS_CONFIG +
        JOB.format(name="right", pki=pki, password=PASSWORD, port=port) +
        JOB.format(name="wrong", pki=pki, password="nope", port=port))
    prometheus = subprocess.Popen(
        ["prometheus", "--config.file=%s" % (tmp_path / "prometheus.yml"),
         "--storage.tsdb.path=%s" % (tmp_path / "data"),
         "--web.listen-address=127.0.0.1:%d" % prom_port],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (right,) = wait_for_query(prom_port, 'up{job="right"}')
        for _ in range(60):     # the first scrape may precede kvmexit's
            if right["value"][1] == "1":
                break
            time.sleep(0.5)
            (right,) = query(prom_port, 'up{job="right"}')
        (wrong,) = wait_for_query(prom_port, 'up{job="wrong"}')
        (build,) = wait_for_query(prom_port, 'kvmexit_build_info')
    finally:
        prometheus.terminate()
        prometheus.wait(30)
        tool.send_signal(signal.SIGTERM)
        out, err = tool.communicate(timeout=30)
    assert right["value"][1] == "1"
    assert wrong["value"][1] == "0"
    assert build["metric"]["job"] == "right"
    assert build["metric"]["version"] == kvmexit.VERSION
    assert (tool.returncode, err) == (0, "")


def test_a_right_password_costs_one_bcrypt_check_not_one_per_scrape(
        serve_with):
    slow = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(14)).decode()
    port = serve_with("basic_auth_users:\n  prom: %s\n" % slow)
    times = []
    for password in (PASSWORD, PASSWORD, "wrong"):
        started = time.monotonic()
        status = get(port, None, "prom", password)[0]
        times.append((status, time.monotonic() - started))
    (first, t1), (again, t2), (wrong, t3) = times
    assert (first, again, wrong) == (200, 200, 401)
    # Cost 14 is ~1 s or more here; remembered, well under.
    assert t1 > 0.5 and t2 < t1 / 5 and t3 > 0.5


#
# Listening on every address
#
EXPOSED = "kvmexit: warning: listening on every address ({where}): anyone " \
    "who reaches this host can read its VMs' names and activity; give one " \
    "address, or TLS and basic_auth_users with --web.config.file\n"


@pytest.mark.parametrize("host, where", [("0.0.0.0", "0.0.0.0:{port}"),
                                         ("::", "[::]:{port}")])
@pytest.mark.parametrize("config", ["none", "tls", "auth", "tls+auth"])
def test_every_address_without_tls_and_auth_warns(pki, hashed, capsys,
                                                  host, where, config):
    text = {"none": None, "tls": TLS,
            "auth": "basic_auth_users:\n  prom: %s\n" % hashed,
            "tls+auth": TLS + "basic_auth_users:\n  prom: %s\n" % hashed
            }[config]
    web = kvmexit.load_web_config(write_config(pki, text)) if text else None
    port = free_port()
    server = kvmexit.listen((host, port), web)
    server.stop()
    warned = "" if config == "tls+auth" else \
        EXPOSED.format(where=where.format(port=port))
    assert capsys.readouterr().err == warned
    assert server.url() == "%s://%s/metrics" % (
        "https" if "tls" in config else "http", where.format(port=port))


def test_one_address_does_not_warn(capsys):
    kvmexit.listen(("127.0.0.1", free_port())).stop()
    assert capsys.readouterr().err == ""
