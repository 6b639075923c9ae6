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


def test_this_kernel_takes_atomic_fetch_and_add():
    # BPF_ATOMIC with BPF_FETCH came in 5.12; this host's kernel is newer
    from observer.probes.availability import has_atomic_fetch
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    assert release >= (5, 12) and has_atomic_fetch()


def test_call_numbers_taken_under_the_lock_are_unique_and_contiguous():
    """The probes' call numbering for kernels without atomic fetch-and-add (5.10), loaded here on
    a tracepoint: two processes, one per CPU, make calls as fast as they can. Each call that got
    a number is counted apart (an atomic add, which says nothing back): a number taken twice
    would leave the numbering counter behind that count. Calls that found the lock held too long
    take none and count as lost; numbered and lost are all the calls."""
    import multiprocessing
    from bcc import BPF
    from observer.probes.program import _SEQ_LOCKED
    calls = 1000000
    text = "BPF_ARRAY(counters, u64, 3);\n" + _SEQ_LOCKED + r"""
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    int k = 0;
    u64 *counter = counters.lookup(&k), seq = 0;
    if (!counter)
        return 0;
    k = take_seq(counter, &seq) ? 1 : 2;   // [1] lost, [2] numbered
    u64 *count = counters.lookup(&k);
    if (count)
        __sync_fetch_and_add(count, 1);
    return 0;
}
"""
    b = BPF(text=text)
    try:
        together = multiprocessing.Barrier(2)
        workers = [multiprocessing.Process(target=_getppid_loop, args=(calls, together))
                   for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        counter, lost, numbered = (b[b"counters"][i].value for i in range(3))
        assert counter == numbered
        assert numbered + lost >= 2 * calls and lost < calls // 100
    finally:
        b.cleanup()


def _getppid_loop(n, together):
    together.wait()
    for _ in range(n):
        os.getppid()


def test_records_of_calls_still_running_are_read_with_the_wakeup_before_them():
    """The ring buffer's reader, woken while calls are still running (an inner call returned,
    the outer has not), lets their records gather before it reads, and reads as soon as none
    runs: the kernel wakes no one for them (it wakes the reader only for a record with none
    unread before it). A record each time this thread calls getppid(): one while calls run,
    three more a little later, all read by the one poll the first woke, which ends when the
    calls do; with no call running, the first is read at once and the three later ones wake
    the reader again."""
    import threading
    from bcc import BPF
    from observer.probes.bpfsys import RingBuffer
    tid = threading.get_native_id()
    b = BPF(text=r"""
BPF_RINGBUF_OUTPUT(events, 8);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u32 tid = bpf_get_current_pid_tgid();
    if (tid == %d)
        events.ringbuf_output(&tid, sizeof(tid), 0);
    return 0;
}
""" % tid)
    assert RingBuffer.GATHER_SECONDS >= 0.01
    got, running = [], [True]
    reader = RingBuffer(b[b"events"].map_fd, lambda data, size: got.append(size),
                        calls_running=lambda: running[0])
    try:
        for calls_run, read_by_the_first in ((True, 4), (False, 1)):
            running[0] = calls_run
            del got[:]
            per_poll = []
            polling = threading.Thread(target=lambda: per_poll.append((reader.poll(5000),
                                                                       len(got))[1]))
            polling.start()
            time.sleep(0.3)                      # the reader waits in its poll
            os.getppid()
            time.sleep(0.005)                    # the reader has woken by now
            for _ in range(3):
                os.getppid()
            running[0] = False                   # the calls end: what gathered is read
            polling.join()
            assert per_poll == [read_by_the_first]
            t = time.monotonic()
            while len(got) < 4 and time.monotonic() - t < 1:
                reader.poll(1000)
            assert len(got) == 4 and time.monotonic() - t < 1   # woken, not the timeout
    finally:
        reader.close()
        b.cleanup()
