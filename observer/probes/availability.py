"""Can BPF watch this kernel? Answers without loading anything into the daemon itself.

- kprobes: the kernel exposes a "kprobe" perf PMU (or tracefs kprobe_events) only when built
  with CONFIG_KPROBE_EVENTS.
- fentry (kfunc): bcc's support_kfunc() can say yes while the load fails with EPERM (this
  project's dev host does exactly that), so the load is tried. The try loads LLVM (RSS ~25 -> ~180
  MB), so it runs in a short-lived child process (python -m observer.probes.fentry_try).
- bcc compiles against /lib/modules/$(uname -r)/build; without it bcc runs `modprobe kheaders` by
  itself, so nothing calls bcc unless that directory exists.
- atomic fetch-and-add (5.12+): the probes number calls with it where the verifier takes it; a
  five-instruction program is loaded straight through bpf(2) to ask (before 5.12: "BPF_STX uses
  reserved fields")."""

import ctypes
import os
import struct
import sys

from .functions import CORE


# linux/capability.h
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def missing_privilege(status_path="/proc/self/status"):
    """None when this process may load and attach BPF programs, else one line on what it lacks
    (asked before anything loads: bcc's own errors then name a map or a function instead)."""
    caps = 0
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    if caps >> CAP_SYS_ADMIN & 1 or (caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1):
        return None
    return ("probes need root: CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON, and this process "
            "has neither")


def has_kprobes(root="/"):
    return any(os.path.exists(os.path.join(root, p)) for p in (
        "sys/bus/event_source/devices/kprobe", "sys/kernel/tracing/kprobe_events",
        "sys/kernel/debug/tracing/kprobe_events"))


def headers_dir():
    return f"/lib/modules/{os.uname().release}/build"


def try_fentry(function=CORE[0], timeout=120):
    """(loaded, why) for one fentry program on `function`, loaded in a child process."""
    if not os.path.isdir(os.path.join(headers_dir(), "include")):
        return False, f"no kernel headers at {headers_dir()} (install linux-headers-{os.uname().release})"
    import subprocess   # only here: the daemon's start needs none (a tenth of a second under TCG)
    try:
        child = subprocess.run([sys.executable, "-m", "observer.probes.fentry_try", function],
                               capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"fentry try on {function} did not finish in {timeout} s"
    last = (child.stdout.strip().splitlines() or ["no answer from the fentry try"])[-1]
    return child.returncode == 0, last


# bpf(2) on x86-64, and what a BPF_PROG_LOAD of a socket filter needs (linux/bpf.h)
SYS_BPF, BPF_PROG_LOAD, BPF_PROG_TYPE_SOCKET_FILTER = 321, 5, 1


def _insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, src << 4 | dst, off, imm)


ATOMIC_FETCH_ADD = b"".join([
    _insn(0x7a, dst=10, off=-8, imm=0),         # *(u64 *)(r10 - 8) = 0
    _insn(0xb7, dst=1, imm=1),                  # r1 = 1
    _insn(0xdb, dst=10, src=1, off=-8, imm=1),  # r1 = atomic_fetch_add((u64 *)(r10 - 8), r1)
    _insn(0xb7, dst=0, imm=0),                  # r0 = 0
    _insn(0x95),                                # exit
])


def has_atomic_fetch():
    """Whether this kernel's verifier takes an atomic fetch-and-add (BPF_ATOMIC | BPF_FETCH)."""
    libc = ctypes.CDLL(None, use_errno=True)
    insns = ctypes.create_string_buffer(ATOMIC_FETCH_ADD)
    license = ctypes.create_string_buffer(b"GPL")
    # union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license; the rest zero
    attr = ctypes.create_string_buffer(struct.pack(
        "<IIQQ", BPF_PROG_TYPE_SOCKET_FILTER, len(ATOMIC_FETCH_ADD) // 8,
        ctypes.addressof(insns), ctypes.addressof(license)), 128)
    fd = libc.syscall(SYS_BPF, BPF_PROG_LOAD, attr, 128)
    if fd < 0:
        return False
    os.close(fd)
    return True
