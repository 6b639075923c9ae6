"""Host side of one lab guest: boot a Debian kernel under QEMU/TCG with virtme-ng, run commands
in it through the agent, talk QMP, capture the kernel's views, and always leave no QEMU behind.

Bounds: one guest at a time (a lock in the cache), 4 GiB of boot RAM plus hot-pluggable slots,
the whole guest under `timeout`, each command under its own timeout."""

import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import time

from . import LabError, kernels
from .marker import CMDLINE_KEY, TOKEN_FILE
from .qmp import QMP

BOOT_MEMORY = "4G"
MAX_MEMORY = "8G"       # room for what scenarios hot-add (pc-dimm, virtio-mem)
PROGRESS_SECONDS = 20   # a long guest command says it is still running this often
# A boot whose console is silent this long before the agent is ready has hung: healthy boots
# are ready in 16-26 s and their longest silence, the agent's start, is about 15 s. Under TCG a
# kernel rarely hangs early in its boot (seen once, in CI on 2026-12-06: 6.1 stopped
# printing right after "Switched to clocksource hpet"); such a guest is killed and booted again.
STALL_SECONDS = 90
BOOT_ATTEMPTS = 2
PMEM = "memmap=512M!4G"  # legacy pmem inside the RAM QEMU puts above 4 GiB (nd_e820)
# The guest keeps the HPET as its clock: from 6.12 the kernel switches to the TSC about 3 s into
# the boot, and 7.2 then patches the TSC read into the timer interrupt's path while the other
# vCPU runs it; under TCG that patch can be met half done ("Oops: int3" in
# ktime_get_update_offsets_now, a panic; once in about 16 boots). 5.10 and 6.1 find the TCG
# TSCs unsynchronized and stay on the HPET anyway.
CLOCK = "tsc=unstable"
# A guest with systemd as init boots a userland of the kernel's suite as its root (vng --root),
# not this machine's: systemd's generators would take this container's /.dockerenv for a
# container (and ignore the kernel command line), and tmpfiles would walk the machine's /tmp
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKOUT_IN_GUEST = "/opt/memhp-observer"


class _Stalled(Exception):
    """The boot's console stopped growing before the agent was ready; the message is its tail."""

    @property
    def last_line(self):
        lines = str(self).strip().splitlines()
        return lines[-1] if lines else ""


def _say(msg):
    print(f"lab: {msg}", file=sys.stderr, flush=True)


class Guest:
    def __init__(self, results, release=None, append=(), qemu_opts=(), boot_timeout=300,
                 stall_seconds=STALL_SECONDS, guest_timeout=2400, systemd_root=None, progress=_say):
        self.results = os.path.abspath(results)
        self.release, self.vmlinuz = kernels.find_kernel(release)
        self.vng = kernels.vng_path()
        self.append = list(append)
        self.qemu_opts = list(qemu_opts)
        self.boot_timeout = boot_timeout
        self.stall_seconds = stall_seconds
        self.guest_timeout = guest_timeout
        self.say = progress
        self.systemd_root = systemd_root
        self.proc = None
        self.lock = None
        self.n = 0
        self._qmp = None
        self.qmp_path = os.path.join(self.results, "qmp.sock")
        self.console = os.path.join(self.results, "console.log")

    # -- lifetime ---------------------------------------------------------------------------
    def __enter__(self):
        self._take_lock()
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _take_lock(self):
        os.makedirs(kernels.CACHE, exist_ok=True)
        self.lock = open(os.path.join(kernels.CACHE, "lab.lock"), "a+")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.seek(0)
            holder = self.lock.read().strip() or "?"
            self.lock.close()
            self.lock = None
            raise LabError(f"another lab guest is running (pid {holder}): one guest at a time")
        self.lock.truncate(0)
        self.lock.write(str(os.getpid()))
        self.lock.flush()

    def boot(self):
        kept = []
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            try:
                return self._boot_once()
            except _Stalled as stalled:
                self._kill()
                kept.append(f"{self.console}.stalled-{attempt}")
                os.replace(self.console, kept[-1])
                if attempt == BOOT_ATTEMPTS:
                    raise LabError(f"boot stalled {attempt} times (console silent for "
                                   f"{self.stall_seconds} s); consoles: {', '.join(kept)}; the last "
                                   f"ends:\n{stalled}") from None
                self.say(f"boot stalled: console silent for {self.stall_seconds} s after "
                         f"{stalled.last_line!r} (kept as {kept[-1]}); booting again")

    def _boot_once(self):
        # request numbers restart at 1 with every boot: answers left by an earlier guest would
        # be taken for this one's
        shutil.rmtree(os.path.join(self.results, "cmd"), ignore_errors=True)
        os.makedirs(os.path.join(self.results, "cmd"))
        for stale in ("ready", "qmp.sock"):
            if os.path.exists(os.path.join(self.results, stale)):
                os.unlink(os.path.join(self.results, stale))
        token = secrets.token_hex(8)
        with open(os.path.join(self.results, TOKEN_FILE), "w") as f:
            f.write(token + "\n")
        append = [PMEM, CLOCK, f"{CMDLINE_KEY}={token}"] + self.append
        qemu = [f"-m {BOOT_MEMORY},slots=4,maxmem={MAX_MEMORY}",
                f"-qmp unix:{self.qmp_path},server=on,wait=off"] + self.qemu_opts
        # --disable-kvm always: KVM hangs on these machines. --verbose keeps the kernel console.
        # Options for QEMU starting with '-' go as one --qemu-opts=... argument.
        cmd = ["timeout", "--kill-after=10", str(self.guest_timeout), self.vng,
               "--run", self.vmlinuz, "--disable-kvm", "--disable-microvm", "--verbose",
               "--memory", BOOT_MEMORY, "--append", " ".join(append),
               f"--rwdir={self.results}={self.results}", f"--qemu-opts={' '.join(qemu)}"]
        if self.systemd_root:
            # the userland's own python runs this checkout, shown read-only where the service
            # unit expects it
            cmd += ["--root", self.systemd_root, "--systemd", f"--rodir={CHECKOUT_IN_GUEST}={TOP}",
                    "--", "env", f"PYTHONPATH={CHECKOUT_IN_GUEST}", "/usr/bin/python3"]
        else:
            cmd += ["--", sys.executable]
        cmd += ["-m", "observer.lab.agent", self.results]
        env = dict(os.environ, PATH=os.path.dirname(self.vng) + ":" + os.environ.get("PATH", ""))
        self.say(f"booting {self.release} under TCG (console: {self.console})")
        began = time.monotonic()
        with open(self.console, "w") as console:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                         stderr=subprocess.STDOUT, env=env, cwd=self.results,
                                         start_new_session=True)
        ready = os.path.join(self.results, "ready")
        printed, printed_at = 0, began
        while not os.path.exists(ready):
            self._alive_or_raise("during boot")
            now = time.monotonic()
            if now - began > self.boot_timeout:
                raise LabError(f"guest not ready after {self.boot_timeout} s; console: "
                               f"{self.console} ends:\n{self._console_tail()}")
            size = os.path.getsize(self.console)
            if size != printed:
                printed, printed_at = size, now
            elif now - printed_at > self.stall_seconds:
                raise _Stalled(self._console_tail())
            time.sleep(0.2)
        with open(ready) as f:
            booted = json.load(f)["kernel"]
        self.say(f"guest {booted} ready in {time.monotonic() - began:.0f} s")
        self.boot_seconds = time.monotonic() - began

    def close(self):
        """Ask the agent to power off; then make sure no process of the guest is left."""
        if self._qmp:
            self._qmp.close()
            self._qmp = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._request({"exit": True}, timeout=20)
                self.proc.wait(timeout=60)
            except (LabError, subprocess.TimeoutExpired):
                pass
            if self.proc.poll() is None:
                self.say("guest did not power off: killing it")
            self._kill()
        if self.lock:
            self.lock.close()
            self.lock = None

    def _kill(self):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            if self._group_gone(timeout=10):
                break
        self.proc.wait()

    def _group_gone(self, timeout):
        """Whether every process of the guest's group (timeout, vng, QEMU) is gone within
        `timeout` s. QEMU can outlive vng by a moment: it is then init's to reap, not ours."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.proc.poll()   # the group's leader is our child: reaped here
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        return False

    def _alive_or_raise(self, when):
        if self.proc.poll() is not None:
            raise LabError(f"guest exited (rc {self.proc.returncode}) {when}; console "
                           f"{self.console} ends:\n{self._console_tail()}")

    def _console_tail(self, lines=15):
        # QEMU opens the console file again (truncating it) while vng's first lines are written:
        # the hole they leave reads as NULs
        try:
            with open(self.console, errors="replace") as f:
                return "\n".join(f.read().replace("\0", "").splitlines()[-lines:])
        except OSError:
            return ""

    # -- talking to the guest ---------------------------------------------------------------
    def _request(self, req, timeout):
        self.n += 1
        cmd = os.path.join(self.results, "cmd")
        path = os.path.join(cmd, f"{self.n}.req")
        with open(path + ".tmp", "w") as f:
            json.dump(req, f)
        os.rename(path + ".tmp", path)
        res = os.path.join(cmd, f"{self.n}.res")
        began = time.monotonic()
        next_note = began + PROGRESS_SECONDS
        while not os.path.exists(res):
            self._alive_or_raise(f"while running request {self.n} {req}")
            now = time.monotonic()
            if now - began > timeout:
                raise LabError(f"no answer to request {self.n} {req} after {timeout} s")
            if now > next_note:
                self.say(f"  ... still running after {now - began:.0f} s")
                next_note = now + PROGRESS_SECONDS
            time.sleep(0.05)
        with open(res) as f:
            return json.load(f)

    def sh(self, command, timeout=120, check=True):
        """Run a shell command in the guest: {"rc", "out", "err", "seconds"}."""
        res = self._request({"sh": command, "timeout": timeout}, timeout + 30)
        if check and res["rc"] != 0:
            raise LabError(f"guest command failed (rc {res['rc']}): {command}\n{res['err'][-2000:]}")
        return res

    def capture(self, name):
        """The kernel's views, now, into RESULTS/captures/NAME (a tree the readers accept).
        Returns the guest's CLOCK_MONOTONIC ns when the capture was taken."""
        res = self._request({"capture": name}, 120)
        tar = os.path.join(self.results, res["tar"])
        out = os.path.join(self.results, "captures", name)
        with tarfile.open(tar) as t:
            t.extractall(out)
        os.unlink(tar)
        return res["ns"]

    @property
    def qmp(self):
        if self._qmp is None:
            self._qmp = QMP(self.qmp_path)
        return self._qmp
