"""Packaging: pip and pipx installs into venvs that see Debian's bcc, the
man page, and kvmexit dropped into bcc's tools directory."""

import configparser
import glob
import os
import re
import shutil
import subprocess

import pytest

import kvmexit
from helpers import HEADER_COLLAPSED, SYSTEM_PYTHON, first_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAN = os.path.join(REPO, "man", "man8", "kvmexit.8")
BPF_SOURCE = os.path.join(REPO, "bpf", "kvmexit.bpf.c")
BCC_TOOLS = "/usr/share/bcc/tools"
SETUP_CFG = configparser.ConfigParser()
SETUP_CFG.read(os.path.join(REPO, "setup.cfg"))
VERSION = SETUP_CFG["metadata"]["version"]
FIRST = "Display kvm exit reasons and statistics for "
# Debian's wheels of pip, setuptools and wheel (python3-*-whl): a build
# from them needs no index at all.
DEBIAN_WHEELS = "/usr/share/python-wheels"
# Debian 12's pipx (1.1.0) leaves man pages inside its venvs, where man
# does not look; .ci/install puts a newer one from PyPI here.
PIPX = os.environ.get("KVMEXIT_PIPX", "/opt/kvmexit-pipx/bin/pipx")
# The man page's (and bcc's) eight example command lines.
EXAMPLES = ["kvmexit", "kvmexit 6", "kvmexit -p 1273795 5",
            "kvmexit -p 1273795 5 -a", "kvmexit -p 1273795 -v 0",
            "kvmexit -p 1273795 -v 0 4", "kvmexit -t 1273819 10",
            "kvmexit -T '1273820,1273819'"]


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def render_man():
    proc = run(["groff", "-man", "-Tutf8", "-ww", MAN],
               env=dict(os.environ, LC_ALL="C.UTF-8"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    # Undo groff's overstriking and its typographic hyphens and quotes.
    text = re.sub(r".\x08", "", proc.stdout)
    return text.replace("\u2010", "-").replace("\u2212", "-") \
        .replace("\u2019", "'").replace("\u2018", "'")


def test_man_page_renders_without_warnings_through_man():
    proc = run(["man", "-l", MAN], env=dict(os.environ, MANPAGER="cat",
                                            MANWIDTH="80"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "kvmexit - Count KVM VM exits" in re.sub(r".\x08", "",
                                                    proc.stdout)


def test_man_page_documents_every_option_and_example():
    text = " ".join(render_man().split())
    options = {o for action in kvmexit.build_parser()._actions
               for o in action.option_strings}
    for option in options:
        assert option in text, option
    for example in EXAMPLES:
        assert "# " + example in text, example
    for section in ("SYNOPSIS", "DESCRIPTION", "REQUIREMENTS", "OPTIONS",
                    "EXAMPLES", "OUTPUT FORMATS", "OVERHEAD", "LIMITS"):
        assert section in text


#
# pip and pipx, each into its own venv that sees Debian's bcc and numpy
#
@pytest.fixture
def source(tmp_path):
    """A copy of the checkout: pip builds in the tree it is given and
    leaves build/ and kvmexit.egg-info/ there."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "build", "*.egg-info"))
    return src


def clean_env(tmp_path, bindir, **extra):
    """This environment with `bindir` first on PATH, less what could find
    an installed kvmexit without its install: PYTHONPATH (a checkout) and
    MANPATH (man must derive it from PATH).  pip's cache goes to tmp_path,
    so that a test leaves nothing outside it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "MANPATH", "VIRTUAL_ENV")}
    env.update(PATH=str(bindir) + os.pathsep + os.environ["PATH"],
               PIP_CACHE_DIR=str(tmp_path / "pip-cache"), **extra)
    return env


def assert_installed(venv, env):
    """kvmexit installed into `venv` is whole and found: the command on
    PATH runs under the venv's interpreter, man finds the page, and the
    module reads the BPF source installed beside it."""
    venv = os.path.realpath(venv)
    command = shutil.which("kvmexit", path=env["PATH"])
    # With pipx, PATH has a link to the command in the venv.
    assert os.path.realpath(command) == os.path.join(venv, "bin", "kvmexit")
    with open(command) as f:
        # pip may add options, e.g. "#!VENV/bin/python -E".
        interpreter = f.readline()[2:].split()[0]
    assert os.path.dirname(interpreter) == os.path.join(venv, "bin")
    proc = run(["kvmexit", "-h"], cwd="/", env=env)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert proc.stdout.startswith("usage: kvmexit [-h] ")

    page = os.path.join(venv, "share", "man", "man8", "kvmexit.8")
    with open(page, "rb") as installed, open(MAN, "rb") as shipped:
        assert installed.read() == shipped.read()
    proc = run(["man", "-w", "kvmexit"], cwd="/", env=env)
    assert proc.returncode == 0, proc.stderr
    # bcc's own page (kvmexit-bpfcc.8) is also indexed as kvmexit: the
    # installed one must come first.
    assert os.path.realpath(proc.stdout.strip()) == page

    # From the venv's interpreter, away from the checkout.
    proc = run([interpreter, "-c", "import kvmexit; "
                "print(kvmexit.__file__); print(kvmexit.bpf_source())"],
               cwd="/", env=env)
    assert proc.returncode == 0, proc.stderr
    module, bpf_source = proc.stdout.splitlines()
    assert glob.glob(os.path.join(venv, "lib", "python3*", "site-packages",
                                  "kvmexit.py")) == [module]
    source = os.path.join(venv, "share", "kvmexit", "kvmexit.bpf.c")
    assert os.path.realpath(bpf_source) == source
    with open(source, "rb") as installed, open(BPF_SOURCE, "rb") as shipped:
        assert installed.read() == shipped.read()
    unit = os.path.join(venv, "lib", "systemd", "system", "kvmexit.service")
    with open(unit, "rb") as installed, open(os.path.join(
            REPO, "deploy", "kvmexit.service"), "rb") as shipped:
        assert installed.read() == shipped.read()

    # A real run: bcc and numpy come from Debian, through the venv.
    proc = run(["kvmexit", "-p", "1", "1"], cwd="/", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [first_line("PID 1", 1),
                                        HEADER_COLLAPSED]


def test_pip_install_into_venv_with_system_site_packages(tmp_path, source):
    venv = tmp_path / "venv"
    env = clean_env(tmp_path, venv / "bin")
    proc = run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages",
                str(venv)], env=env)
    assert proc.returncode == 0, proc.stderr
    # Build isolation on, with Debian's setuptools and wheel: no index.
    proc = run([str(venv / "bin" / "pip"), "install", "--no-index",
                "--find-links", DEBIAN_WHEELS, "."], cwd=source, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Successfully installed kvmexit-%s" % VERSION in proc.stdout
    assert_installed(venv, env)


def test_pipx_install_with_system_site_packages(tmp_path, source):
    # pipx's default layout, ~/.local/{bin,share/man}, moved to tmp_path:
    # man derives share/man from bin on PATH, so MANPATH stays unset.
    bindir = tmp_path / "bin"
    env = clean_env(tmp_path, bindir, PIPX_HOME=str(tmp_path / "pipx"),
                    PIPX_BIN_DIR=str(bindir),
                    PIPX_MAN_DIR=str(tmp_path / "share" / "man"))
    proc = run([PIPX, "install", "--python", SYSTEM_PYTHON,
                "--system-site-packages", "."], cwd=source, env=env)
    assert proc.returncode == 0, proc.stderr
    venv = tmp_path / "pipx" / "venvs" / "kvmexit"
    link = tmp_path / "share" / "man" / "man8" / "kvmexit.8"
    assert os.path.realpath(link) == os.path.realpath(
        venv / "share" / "man" / "man8" / "kvmexit.8")
    assert_installed(venv, env)


@pytest.fixture
def bcc_tools():
    os.makedirs(BCC_TOOLS, exist_ok=True)
    placed = []
    yield placed
    for path in placed:
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)


def test_drop_in_as_symlink_in_bcc_tools_runs(bcc_tools):
    tool = os.path.join(BCC_TOOLS, "kvmexit")
    bcc_tools.append(tool)
    os.symlink(os.path.join(REPO, "kvmexit.py"), tool)
    proc = run([tool, "-t", str(os.getpid()), "1"], cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        FIRST + "TID %d after sleeping 1 secs." % os.getpid(),
        "KVM_EXIT_REASON" + " " * 21 + "COUNT"]


def test_drop_in_as_copy_with_bpf_source_in_share_runs(bcc_tools):
    tool = os.path.join(BCC_TOOLS, "kvmexit")
    share = "/usr/share/kvmexit"
    assert not os.path.exists(share)
    bcc_tools += [tool, share]
    shutil.copy(os.path.join(REPO, "kvmexit.py"), tool)
    os.makedirs(share)
    shutil.copy(os.path.join(REPO, "bpf", "kvmexit.bpf.c"), share)
    proc = run([tool, "-p", "1", "1"], cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == FIRST + "PID 1 after sleeping 1 " \
        "secs."
    os.unlink(os.path.join(share, "kvmexit.bpf.c"))
    proc = run([tool, "-p", "1", "1"], cwd="/")
    assert (proc.returncode, proc.stderr) == (
        1, "kvmexit: cannot find kvmexit.bpf.c beside %s or in "
        "share/kvmexit\n" % BCC_TOOLS)
