"""Host BPF smoke test: bcc compiles a tracepoint program here, attaches it, and events reach
Python through the BPF ring buffer. Needs the set-up's headers link and tracefs (scripts/setup.sh);
this host's kernel has no kprobes and refuses fentry, so tracepoints are what it can show."""

import os
import time

from observer.probes.availability import headers_dir

PROGRAM = r"""
struct event { u32 pid; char comm[16]; };
BPF_RINGBUF_OUTPUT(events, 8);

TRACEPOINT_PROBE(syscalls, sys_enter_openat) {
    struct event e = {};
    e.pid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    events.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}
"""


def test_setup_made_bcc_usable():
    # checked before bcc is imported: without headers bcc would run `modprobe kheaders`
    assert os.path.isdir(os.path.join(headers_dir(), "include")), headers_dir()
    assert os.path.isdir("/sys/kernel/tracing/events/syscalls"), "tracefs not mounted"


def test_tracepoint_events_reach_python_through_the_ring_buffer():
    from bcc import BPF
    b = BPF(text=PROGRAM)
    try:
        pids = []
        b[b"events"].open_ring_buffer(lambda ctx, data, size: pids.append(b[b"events"].event(data).pid))
        deadline = time.monotonic() + 10
        while os.getpid() not in pids and time.monotonic() < deadline:
            open("/proc/self/stat").close()
            b.ring_buffer_poll(timeout=200)
        assert os.getpid() in pids
    finally:
        b.cleanup()
