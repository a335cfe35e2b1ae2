"""Command line: every option of kvmexit(8)'s synopsis

    kvmexit [-h] [-p PID [-v VCPU | -a] ] [-t TID | -T 'TID1,TID2'] [duration]

and every usage error of issue 2.  argparse's usage errors exit 2 with
'kvmexit: error: ...' as the last stderr line; kvmexit's own errors (one
'kvmexit: ...' line, exit 1) are run as commands in test_cli.py."""

import pytest

from helpers import SCRIPT, run_tool
import kvmexit


def parse(*argv):
    return kvmexit.parse_args([str(a) for a in argv])


def usage_error(capsys, *argv):
    """The last stderr line of a usage error, which must exit 2."""
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: kvmexit ")
    assert "Traceback" not in err
    return err.splitlines()[-1]


#
# The synopsis, option by option
#
def test_no_arguments_trace_all_threads_until_ctrl_c():
    args = parse()
    assert (args.pid, args.vcpu, args.alltids, args.tid, args.tids,
            args.duration) == (None, None, False, None, None, None)


def test_duration_is_a_positional_number_of_seconds():
    assert parse(6).duration == 6


@pytest.mark.parametrize("flag", ["-p", "--pid"])
def test_pid_option(flag):
    args = parse(flag, 1273795, 5)
    assert (args.pid, args.duration) == (1273795, 5)


def test_duration_may_come_before_or_after_the_options():
    # The man page's example: kvmexit -p 1273795 5 -a
    args = parse("-p", 1273795, 5, "-a")
    assert (args.pid, args.duration, args.alltids) == (1273795, 5, True)


@pytest.mark.parametrize("flag", ["-v", "--vcpu"])
def test_vcpu_option_with_pid(flag):
    args = parse("-p", 1273795, flag, 0, 4)
    assert (args.pid, args.vcpu, args.duration) == (1273795, 0, 4)


def test_vcpu_zero_is_a_vcpu_not_a_missing_option():
    assert parse("-p", 9, "-v", 0).vcpu == 0


@pytest.mark.parametrize("flag", ["-a", "--alltids"])
def test_alltids_option_with_pid(flag):
    args = parse("-p", 9, flag)
    assert (args.pid, args.alltids, args.vcpu) == (9, True, None)


@pytest.mark.parametrize("flag", ["-t", "--tid"])
def test_tid_option(flag):
    args = parse(flag, 1273819, 10)
    assert (args.tid, args.tids, args.duration) == (1273819, None, 10)


@pytest.mark.parametrize("flag", ["-T", "--tids"])
def test_tids_option_is_a_comma_separated_list(flag):
    args = parse(flag, "1273820,1273819")
    assert (args.tids, args.tid) == ([1273820, 1273819], None)


def test_tids_option_with_one_tid():
    assert parse("-T", "42").tids == [42]


def test_pid_with_tid_is_accepted_by_the_parser():
    # Whether the TID belongs to the PID is checked against /proc.
    args = parse("-p", 5, "-t", 7)
    assert (args.pid, args.tid) == (5, 7)


@pytest.mark.parametrize("flag", ["-d", "--debug"])
def test_debug_option(flag):
    assert parse(flag).debug is True
    assert parse().debug is False


@pytest.mark.parametrize("probe", ["auto", "raw", "tracepoint"])
def test_probe_option(probe):
    assert parse("--probe", probe).probe == probe


def test_probe_defaults_to_auto():
    assert parse().probe == "auto"


def test_probe_rejects_unknown_kinds(capsys):
    assert usage_error(capsys, "--probe", "kprobe") == \
        "kvmexit: error: argument --probe: invalid choice: 'kprobe' " \
        "(choose from 'auto', 'raw', 'tracepoint')"


def test_max_threads_option():
    assert parse("--max-threads", 64).max_threads == 64
    assert parse().max_threads is None


def test_help_shows_the_synopsis_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        parse("-h")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kvmexit [-h] [-p PID [-v VCPU | -a]] "
                          "[-t TID | -T 'TID1,TID2']")
    for option in ("-p PID, --pid PID", "-v VCPU, --vcpu VCPU",
                   "-a, --alltids", "-t TID, --tid TID",
                   "-T TIDS, --tids TIDS", "duration"):
        assert option in out


#
# Usage errors (argparse: exit 2, 'kvmexit: error: ...')
#
@pytest.mark.parametrize("argv", [["-v", "0"], ["-a"], ["-v", "1", "5"],
                                  ["-a", "-t", "7"]])
def test_vcpu_or_alltids_without_pid_is_a_usage_error(capsys, argv):
    assert usage_error(capsys, *argv) == \
        "kvmexit: error: -v and -a need -p PID"


def test_vcpu_with_alltids_is_a_usage_error(capsys):
    assert usage_error(capsys, "-p", 5, "-v", 1, "-a") == \
        "kvmexit: error: argument -a/--alltids: not allowed with argument " \
        "-v/--vcpu"


def test_tid_with_tids_is_a_usage_error(capsys):
    assert usage_error(capsys, "-t", 7, "-T", "7,8") == \
        "kvmexit: error: argument -T/--tids: not allowed with argument " \
        "-t/--tid"


@pytest.mark.parametrize("text", ["1,,2", "", ",", "1,", ",2", "7, ,8"])
def test_tids_with_an_empty_item_is_a_usage_error(capsys, text):
    assert usage_error(capsys, "-T", text) == \
        "kvmexit: error: argument -T/--tids: must be comma-separated " \
        "positive integers: %r" % text


@pytest.mark.parametrize("text", ["-1", "1,-2", "-7,8"])
def test_tids_with_a_negative_item_is_a_usage_error(capsys, text):
    # '--tids=-7,8': argparse itself refuses '-T -7,8' (next test).
    assert usage_error(capsys, "--tids=" + text) == \
        "kvmexit: error: argument -T/--tids: must be comma-separated " \
        "positive integers: %r" % text


def test_tids_starting_with_a_minus_is_taken_for_an_option(capsys):
    assert usage_error(capsys, "-T", "-7,8") == \
        "kvmexit: error: argument -T/--tids: expected one argument"


@pytest.mark.parametrize("text", ["a", "1,b", "1.5", "0x10", "1;2", "7 8",
                                  "0", "1,0"])
def test_tids_with_a_non_integer_or_zero_item_is_a_usage_error(capsys,
                                                                text):
    assert usage_error(capsys, "-T", text) == \
        "kvmexit: error: argument -T/--tids: must be comma-separated " \
        "positive integers: %r" % text


@pytest.mark.parametrize("text", ["0", "-1", "x", "1.5", ""])
def test_duration_not_a_positive_integer_is_a_usage_error(capsys, text):
    assert usage_error(capsys, text) == \
        "kvmexit: error: argument duration: must be a positive integer: " \
        "%r" % text


@pytest.mark.parametrize("flag,name", [("-p", "-p/--pid"),
                                       ("-t", "-t/--tid"),
                                       ("--max-threads", "--max-threads")])
@pytest.mark.parametrize("text", ["0", "-5", "x"])
def test_ids_must_be_positive_integers(capsys, flag, name, text):
    assert usage_error(capsys, flag, text) == \
        "kvmexit: error: argument %s: must be a positive integer: %r" % (
            name, text)


@pytest.mark.parametrize("text", ["-1", "x", "1.0"])
def test_vcpu_must_be_a_non_negative_integer(capsys, text):
    assert usage_error(capsys, "-p", 5, "-v", text) == \
        "kvmexit: error: argument -v/--vcpu: must be a non-negative " \
        "integer: %r" % text


def test_two_durations_are_a_usage_error(capsys):
    assert usage_error(capsys, 1, 2) == \
        "kvmexit: error: unrecognized arguments: 2"


def test_usage_errors_exit_2_without_traceback_when_run_as_a_command():
    result = run_tool(["-T", "1,,2"], python=None, script=SCRIPT)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == \
        "kvmexit: error: argument -T/--tids: must be comma-separated " \
        "positive integers: '1,,2'"
