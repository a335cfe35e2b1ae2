"""Packaging: setup.cfg's install, the man page, and kvmexit dropped into
bcc's tools directory."""

import glob
import os
import re
import shutil
import subprocess

import pytest

import kvmexit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAN = os.path.join(REPO, "man", "man8", "kvmexit.8")
BCC_TOOLS = "/usr/share/bcc/tools"
FIRST = "Display kvm exit reasons and statistics for "
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


def test_setup_cfg_installs_command_man_page_and_bpf_source(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "build", "*.egg-info"))
    root = tmp_path / "root"
    proc = run(["/usr/bin/python3", "-c", "import setuptools; "
                "setuptools.setup()", "install", "--root", str(root),
                "--prefix", "/usr/local"], cwd=src)
    assert proc.returncode == 0, proc.stderr
    prefix = root / "usr" / "local"
    assert (prefix / "share" / "man" / "man8" / "kvmexit.8").read_text() == \
        open(MAN).read()
    assert (prefix / "share" / "kvmexit" / "kvmexit.bpf.c").read_text() == \
        open(os.path.join(REPO, "bpf", "kvmexit.bpf.c")).read()
    site = glob.glob(str(prefix / "lib" / "python3*" / "*-packages"))
    assert len(site) == 1 and os.path.exists(site[0] + "/kvmexit.py")
    command = prefix / "bin" / "kvmexit"
    assert open(command).readline() == "#!/usr/bin/python3\n"
    # Run from elsewhere, so that the copy in the source tree is no help.
    proc = run([str(command), "-p", "1", "1"], cwd="/",
               env=dict(os.environ, PYTHONPATH=site[0]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        FIRST + "PID 1 after sleeping 1 secs.",
        "KVM_EXIT_REASON" + " " * 21 + "COUNT"]


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
