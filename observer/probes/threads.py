"""Whether a thread has left a kernel function, from /proc: for a call in flight whose return
probe did not run. A kprobe program is skipped, silently, when it fires while another BPF
program or a map syscall holds the CPU's bpf_prog_active (a preemptible kernel can switch away
from a syscall holding it), and a kretprobe with no free instance misses its return: the call's
entry stays in the map of calls in flight for good, and the model would take it as running."""

import os
import time

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def left(tid, function, entered_ns):
    """True when thread `tid`, which entered `function` at CLOCK_MONOTONIC `entered_ns`, is
    certainly not inside it now: it has exited (or its number names a thread begun since), or
    it sleeps and its whole kernel stack has no frame of the function. False when it may be
    inside: running, its stack unreadable or cut short, or it ran while the stack was read."""
    before = _stat(tid)
    if before is None:
        return True
    state, started_ns, switches = before
    boot_minus_monotonic = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    if started_ns > entered_ns + boot_minus_monotonic + 10**9 // TICKS_PER_SECOND:
        return True
    if state not in "SDI":
        return False
    try:
        with open(f"/proc/{tid}/stack") as f:
            stack = f.read()
    except FileNotFoundError:
        return True
    except OSError:          # no CAP_SYS_ADMIN, or a kernel without stack traces
        return False
    after = _stat(tid)
    if after is None:
        return True
    if after != before:
        return False
    # "[<0>] memremap_pages+0x1c5/0x6a0", or a clone "memremap_pages.cold+0x5/0x20"
    return outside([line.split("] ", 1)[-1].split("+")[0] for line in stack.splitlines()],
                   function)


def outside(frames, function):
    """Whether a sleeping thread whose kernel stack is these frames (innermost first) is not
    inside `function`: only when the stack is whole (down to the syscall entry or the kernel
    thread's start) and no probe hid a frame. A kretprobe puts its trampoline where the return
    address into the caller was, and before rethook (5.10) the unwinder shows the trampoline,
    not the caller: a function with a probed callee running is not on its stack by name."""
    names = [f.split(".")[0] for f in frames]
    whole = bool(names) and names[-1].startswith(("entry_", "ret_from_fork"))
    hidden = any("kretprobe_trampoline" in n or "rethook_trampoline" in n for n in names)
    return whole and not hidden and function not in names


def _stat(tid):
    """(state, start as CLOCK_BOOTTIME ns, context switches so far), or None once it is gone."""
    try:
        with open(f"/proc/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{tid}/status") as f:
            switches = sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    # fields from the third (state) on: starttime, the 22nd, is in clock ticks since boot
    return fields[0], int(fields[19]) * 10**9 // TICKS_PER_SECOND, switches
