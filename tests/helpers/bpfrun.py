"""Run a loaded raw tracepoint program in the kernel with chosen arguments.

BPF_PROG_TEST_RUN runs the program once on the calling CPU, with the
calling thread as `current`, so a thread pinned to a CPU makes the program
see exactly that (tid, CPU) -- a stand-in for kvm_exit firing in a vCPU
thread.  Regular tracepoint programs cannot be test-run.
"""

import ctypes
import os
import struct
import threading

import kvmexit

# bpf(2)'s number: x86_64's, or arm64's (the arm64 lab's benchmarks).
SYS_BPF = {"aarch64": 280}.get(os.uname().machine, 321)
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15

_libc = ctypes.CDLL(None, use_errno=True)


class TestEntries(kvmexit.Program):
    """A kvmexit program that also has the raw tracepoint entries that
    BPF_PROG_TEST_RUN can run (-DTEST_ENTRIES): tests and benchmarks only."""

    __slots__ = ()

    def cflags(self):
        return super().cflags() + ["-DTEST_ENTRIES"]


def bpf(cmd, attr, size=None):
    """The bpf(2) syscall on a copy of `attr` padded to `size` bytes;
    returns (its result, the attr bytes as the kernel left them)."""
    buf = ctypes.create_string_buffer(attr, size or len(attr))
    ret = _libc.syscall(SYS_BPF, cmd, buf, len(buf))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret, buf.raw


def test_run(prog_fd, args):
    """Run the program once with ctx->args = args (u64 each)."""
    ctx = struct.pack("<%dQ" % len(args), *args)
    ctx_buf = ctypes.create_string_buffer(ctx, len(ctx))
    attr = struct.pack("<IIIIQQIIIIQQIII4x", prog_fd, 0, 0, 0, 0, 0, 0, 0,
                       len(ctx), 0, ctypes.addressof(ctx_buf), 0, 0, 0, 0)
    _, out = bpf(BPF_PROG_TEST_RUN, attr)
    return struct.unpack_from("<I", out, 4)[0]       # retval


def run_stats(prog_fd):
    """(run_time_ns, run_cnt) with kernel.bpf_stats_enabled=1."""
    info = ctypes.create_string_buffer(256)
    attr = struct.pack("<IIQ", prog_fd, len(info), ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return struct.unpack_from("<QQ", info.raw, 192)


def in_thread(cpu, fn, *args):
    """Call fn(tid, *args) in a new thread pinned to `cpu`; return its
    result."""
    result = {}

    def body():
        os.sched_setaffinity(0, {cpu})
        result["value"] = fn(threading.get_native_id(), *args)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return result["value"]


class PinnedThread:
    """A thread that stays alive, pinned to a CPU it may move between, and
    fires exits on request: several of them interleave on one CPU."""

    def __init__(self):
        self._jobs, self._done = [], threading.Semaphore(0)
        self._wake = threading.Semaphore(0)
        self.tid = None
        ready = threading.Event()

        def body():
            self.tid = threading.get_native_id()
            ready.set()
            while True:
                self._wake.acquire()
                job = self._jobs.pop(0)
                if job is None:
                    return
                job()
                self._done.release()

        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()
        ready.wait()

    def call(self, fn):
        self._jobs.append(fn)
        self._wake.release()
        self._done.acquire()

    def exits(self, prog_fd, cpu, code, isa, times=1, vcpu=0):
        """`times` raw-old kvm_exit events (exit_reason, vcpu, isa) on
        `cpu`, from this thread."""
        def job():
            os.sched_setaffinity(0, {cpu})
            for _ in range(times):
                test_run(prog_fd, [code, vcpu, isa])
        self.call(job)

    def stop(self):
        self._jobs.append(None)
        self._wake.release()
        self._thread.join()
