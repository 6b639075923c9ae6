"""Servers a benchmark starts and measures: started, waited for, stopped, their CPU and memory."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
EXE = os.path.join(os.path.dirname(sys.executable), "memhp-observer")   # the venv's daemon
# seconds from SIGTERM to SIGKILL for a process the bench stops: bpftrace waiting in epoll_wait
# can miss SIGTERM until an event comes, and an idle guest makes none (CI37: still there two
# minutes after, in do_epoll_wait)
KILL_AFTER = 30


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """User and system CPU time the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND   # utime, stime


def until_idle(pid, still=0.5, timeout=60.0):
    """Until the process has used no CPU for `still` seconds, or `timeout` passed."""
    began, last, since = time.monotonic(), cpu_seconds(pid), time.monotonic()
    while time.monotonic() - since < still and time.monotonic() - began < timeout:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now != last:
            last, since = now, time.monotonic()


class Server:
    """A process serving /metrics on 127.0.0.1:port, for the length of a with block."""

    def __init__(self, argv, port, timeout=60):
        self.argv, self.port, self.timeout = argv, port, timeout
        self.proc = None

    def __enter__(self):
        self.log = tempfile.TemporaryFile(mode="w+")   # not a pipe: a full one would stall it
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.log.seek(0)
                    said = self.log.read()[-1000:]
                    self.__exit__()
                    raise RuntimeError(f"{self.argv[0]} did not serve /metrics: {said}") from None
                time.sleep(0.1)

    def __exit__(self, *_):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def cpu_seconds(self):
        return cpu_seconds(self.proc.pid)

    def rss_bytes(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
