"""A stand-in for a VMM: a real process with the process name (comm) and
command line a test chooses, whose exits to KVM are BPF_PROG_TEST_RUN runs
of a kvmexit program (raw-old, SVM) whose fd it inherits.  For the names
the kernel takes from a VM's own memory: only the VM's process has its
command line.

In a test:   vm = Vmm.start(fd, "qemu-system-x86", ["-name", "guest=a"])
             vm.exits(cpu, code, times); vm.end()
             Vmm.start(..., pid=N) gives it PID N (a reused PID).
The child:   python3 vmm.py ARGS...  with its fd and comm in the
             environment, so that its command line is the interpreter,
             this file, then ARGS, as a VMM's is its binary then its
             arguments.  It says "ready" once named; then, on stdin,
             "CPU CODE TIMES" fires TIMES exits of CODE on CPU (answer:
             "ok"); the end of stdin ends it.
"""

import ctypes
import os
import struct
import subprocess
import sys

HERE = os.path.abspath(__file__)
SYSTEM_PYTHON = "/usr/bin/python3"
PR_SET_NAME = 15
SYS_CLONE3 = 435                # x86_64
SIGCHLD = 17


class Vmm:
    def __init__(self, pid, stdin, stdout, proc=None):
        self.pid, self.stdin, self.stdout, self.proc = pid, stdin, stdout, \
            proc

    @classmethod
    def start(cls, fd, comm, args, pid=None):
        """A new VMM stand-in named `comm` with command line args (after
        the interpreter and this file); with `pid`, that PID."""
        argv = [SYSTEM_PYTHON, HERE] + list(args)
        env = dict(os.environ, KVMEXIT_TEST_FD=str(fd),
                   KVMEXIT_TEST_COMM=comm)
        if pid is None:
            proc = subprocess.Popen(argv, env=env, pass_fds=[fd],
                                    stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            vmm = cls(proc.pid, proc.stdin, proc.stdout, proc)
        else:
            vmm = cls(*spawn_as(pid, argv, env, fd))
        # Named and with its own command line from here on.
        assert vmm.stdout.readline() == "ready\n"
        return vmm

    def cmdline(self):
        """Its command line, as the kernel has it (/proc/PID/cmdline)."""
        with open("/proc/%d/cmdline" % self.pid, "rb") as f:
            return f.read()

    def exits(self, cpu, code, times=1):
        self.stdin.write("%d %d %d\n" % (cpu, code, times))
        self.stdin.flush()
        assert self.stdout.readline() == "ok\n"

    def end(self):
        """End it and reap it: its PID is free again."""
        self.stdin.close()
        if self.proc is not None:
            assert self.proc.wait(timeout=30) == 0
        else:
            _, status = os.waitpid(self.pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        self.stdout.close()


def c_strings(items):
    """A NULL-terminated char *[] of these strings."""
    return (ctypes.c_char_p * (len(items) + 1))(
        *[item.encode() for item in items], None)


def spawn_as(pid, argv, env, fd):
    """Start argv with PID `pid` (clone3's set_tid: root, and the PID
    free), stdin and stdout piped, fd inherited; (pid, stdin, stdout).
    The child runs only C calls prepared here before it execs, as
    fork() in a threaded process must."""
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    os.set_inheritable(fd, True)
    c_argv = c_strings(argv)
    c_env = c_strings(["%s=%s" % item for item in env.items()])
    tids = (ctypes.c_int * 1)(pid)
    # struct clone_args up to set_tid_size (CLONE_ARGS_SIZE_VER1).
    args = ctypes.create_string_buffer(struct.pack(
        "<10Q", 0, 0, 0, 0, SIGCHLD, 0, 0, 0, ctypes.addressof(tids), 1))
    # PyDLL: the GIL stays held across clone3, so the child has it.
    libc = ctypes.PyDLL(None, use_errno=True)
    child = libc.syscall(SYS_CLONE3, args, len(args.raw))
    if child == 0:
        libc.dup2(to_child, 0)
        libc.dup2(from_child, 1)
        libc.execve(c_argv[0], c_argv, c_env)
        libc._exit(127)
    err = ctypes.get_errno()
    os.close(to_child)
    os.close(from_child)
    if child < 0:
        os.close(from_parent)
        os.close(to_parent)
        raise OSError(err, "clone3 with PID %d: %s" % (pid, os.strerror(err)))
    assert child == pid
    return (child, open(from_parent, "w"), open(to_parent, "r"))


def main():
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from helpers import bpfrun
    import kvmexit

    fd = int(os.environ["KVMEXIT_TEST_FD"])
    ctypes.CDLL(None).prctl(PR_SET_NAME,
                            os.environ["KVMEXIT_TEST_COMM"].encode(), 0, 0,
                            0)
    print("ready", flush=True)
    for line in sys.stdin:
        cpu, code, times = map(int, line.split())
        os.sched_setaffinity(0, {cpu})
        for _ in range(times):
            bpfrun.test_run(fd, [code, 0, kvmexit.ISA_SVM])
        print("ok", flush=True)


if __name__ == "__main__":
    main()
