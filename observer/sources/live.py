"""The live source, one for `record` and `run`: the kernel views, memory-block uevents and, in
BPF mode, the probes' events, as one stream of trace records in the order the model needs.

The views may be read in another thread (a read can hang on sysfs); a snapshot record is put
out only after every probed call that entered before its read ended (so the model sees what
ran during the read before it sees the read: a call still running is put out as `begun`), or
after WAIT_SECONDS without, marked unknown.

A read of the views reads again only the memory blocks that uevents named since the read
before (the uevents waiting are taken just before it begins); every block is read at the first
read, every FULL_READ_SECONDS, after the kernel dropped uevents, after a probed call returned
(its uevent may not be sent yet), and always where no uevent comes (a tree under another root,
unless uevents are given for it)."""

import os
import queue
import threading
import time

from .. import formats, snapshot
from ..trace import FORMAT, VERSION
from ..uevents import UeventListener
from ..views.cpuinfo import address_bits

SECTION_SIZE_X86_64 = 1 << 27    # SECTION_SIZE_BITS on x86-64; not exported by the kernel
WAIT_SECONDS = 5.0               # longer than the call order waits for a call's number (1 s)
FULL_READ_SECONDS = 600.0        # every block read again this often, uevents or not


class LiveSource:
    def __init__(self, root="/", probes=None, status=None, uevents=None):
        """probes: attached Probes (BPF mode), or None (procfs mode); status: every function's
        ProbeStatus, for the header; uevents: where memory-block uevents come from (wait, take,
        overflowed, close as UeventListener has them), by default the kernel's when root is /."""
        self.root = root
        self.probes = probes
        self.status = status or {}
        self.mode = "bpf" if probes else "procfs"
        self.uevents = uevents if uevents is not None else UeventListener() if root == "/" else None
        self._read = queue.SimpleQueue()   # views read, their record not yet put out
        self._waiting = None               # the one whose calls are still coming in
        self.lost = 0
        self._lock = threading.Lock()      # the uevents below are taken by both threads
        self._taken = []                   # uevents taken, not yet put out
        self._changed = {}                 # block -> the last action uevents named it with since
                                           # the last read of the views
        self._blocks = None                # the memory blocks of the last read
        self._full_read_at = None          # when every block was last read (monotonic)
        self._returned = 0                 # probed calls returned before the last read began

    def header(self, first):
        """The trace header, from the first Snapshot read."""
        return {"type": "header", "format": FORMAT, "version": VERSION,
                "kernel": first.kernel, "page_size": first.page_size,
                "section_size": SECTION_SIZE_X86_64 if os.uname().machine == "x86_64" else None,
                "block_size": first.blocks.block_size, "mode": self.mode,
                "start_time_ns": time.time_ns(), "start_monotonic_ns": time.monotonic_ns(),
                "address_bits": address_bits(self.root),
                "probes": {fn: {"attached": st.attached,
                                "method": st.method if st.attached else "none",
                                "shape": st.shape, "reason": st.reason}
                           for fn, st in self.status.items()}}

    def read_views(self):
        """Read every view (in any thread) and queue its snapshot record; the Snapshot."""
        with self._lock:
            self._take_uevents()
            changed, self._changed = self._changed, {}
            overflowed = self.uevents is not None and self.uevents.overflowed
            if overflowed:
                self.uevents.overflowed = False
        # a probed call that returned since the last read may have changed a block whose uevent
        # the kernel has not sent yet (it comes after the call, milliseconds later under TCG)
        returned = self.probes.calls_returned() if self.probes else 0
        before, self._blocks = self._blocks, None   # a read that fails makes the next one full
        full = self.uevents is None or before is None or overflowed or \
            returned != self._returned or \
            time.monotonic() - self._full_read_at >= FULL_READ_SECONDS
        self._returned = returned
        began = time.monotonic_ns()     # after the uevents taken: they came before the read
        snap = snapshot.take(self.root, None if full else before, changed)
        ended = time.monotonic_ns()
        if full:
            self._full_read_at = time.monotonic()
        self._blocks = snap.blocks
        calls = self.probes.calls_begun() if self.probes else 0
        self._read.put((snap, began, ended, calls, time.monotonic()))
        return snap

    def _take_uevents(self):
        """The uevents waiting, kept to be put out, their blocks to be read again. Lock held."""
        taken = self.uevents.take() if self.uevents else []
        self._taken += taken
        self._changed.update((u["block"], u["action"]) for u in taken)

    def poll(self, timeout=0.2):
        """The records now, in order: events (and begun/skipped/lost) and uevents, each
        snapshot placed after the calls begun before its read ended and before those after."""
        calls = []
        if self.probes:
            calls = self._probe_records(*self.probes.poll(int(timeout * 1000)))
            timeout = 0
        if self.uevents and timeout:
            self.uevents.wait(timeout)
        elif timeout:
            time.sleep(timeout)
        return self._in_order(calls, self._uevents(), final=False)

    def _uevents(self):
        """The uevents taken and not yet put out, now put out."""
        with self._lock:
            self._take_uevents()
            taken, self._taken = self._taken, []
        return taken

    def _probe_records(self, records, lost):
        if lost:
            self.lost += lost
            records = records + [{"type": "lost", "ts_ns": time.monotonic_ns(), "count": lost}]
        return records

    def _in_order(self, calls, uevents, final):
        """Put out the snapshots whose calls are all in: each after the calls numbered below its
        calls_before and the uevents of its read; what remains follows."""
        out = []
        while True:
            if self._waiting is None:
                try:
                    self._waiting = self._read.get_nowait()
                except queue.Empty:
                    break
            snap, began, ended, before, read_at = self._waiting
            if self.probes and self.probes.released_below() < before:
                calls += self.probes.release_to(before)   # a call still running: `begun` now
            if self.probes and self.probes.released_below() < before:
                if not final and time.monotonic() - read_at < WAIT_SECONDS:
                    break
                before = None   # the model holds the snapshot until the trace is past it
            split = len(calls) if before is None else next(
                (i for i, r in enumerate(calls) if r.get("seq", -1) >= before), len(calls))
            out += calls[:split] + [u for u in uevents if u["ts_ns"] <= ended]
            calls, uevents = calls[split:], [u for u in uevents if u["ts_ns"] > ended]
            out.append(formats.snapshot_record(snap, began, ended, before))
            self._waiting = None
        return out + calls + uevents

    def drain(self):
        """At the end: every record still held."""
        out = []
        if self.probes:
            deadline = time.monotonic() + WAIT_SECONDS
            while self._waiting_for_calls() and time.monotonic() < deadline:
                out += self.poll(0.1)
            records, lost = self.probes.poll(0)
            calls = self._probe_records(records + self.probes.drain(), lost)
        else:
            calls = []
        return out + self._in_order(calls, self._uevents(), final=True)

    def _waiting_for_calls(self):
        return self._waiting is not None or not self._read.empty()

    def holding(self):
        """Whether records are held back until their turn, which may come by time alone (a
        read waiting for its calls, an event for a number lost): poll again soon."""
        return self._waiting_for_calls() or bool(self.probes and self.probes.holding())

    def close(self):
        if self.probes:
            self.probes.close()
        if self.uevents:
            self.uevents.close()
