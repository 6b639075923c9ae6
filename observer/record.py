"""`memhp-observer record`: a trace (v1) of the hotplug calls the probes see, with snapshots of
the kernel views at start, on a period and at the end, so the trace alone can be replayed."""

import os
import time

from . import log
from .probes.loader import attach
from .sources.live import LiveSource
from .trace import TraceWriter


def record(path, stop, duration=None, snapshot_interval=10.0, root="/", strict=False, mode="auto",
           probe_method="auto"):
    """Record until `stop` (a threading.Event) is set or `duration` seconds pass. Returns counts.
    mode: auto (BPF where it attaches, else procfs), bpf (fail unless a probe attaches), procfs
    (no probes: snapshots and memory-block uevents)."""
    writer = TraceWriter(path)   # before anything is attached: a bad path fails first
    source = None
    try:
        began = time.monotonic()
        probes, status = attach(mode, strict, probe_method) if mode != "procfs" else (None, {})
        source = LiveSource(root, probes, status)   # procfs mode needs neither BTF nor bcc
        attached = [fn for fn, st in status.items() if st.attached]
        took = time.monotonic() - began
        # views it cannot read end it here, with one line naming them and none before
        writer.write(source.header(source.read_views()))
        log.info("recording to %s in %s mode: %d of %d functions attached (%.1f s)", path,
                 source.mode, len(attached), len(status), took)
        return _record_until(writer, source, stop, duration, snapshot_interval)
    finally:
        writer.close()
        if writer.lines == 0:
            os.unlink(path)   # the empty file this call created, when nothing could be recorded
        if source:
            source.close()


def _record_until(writer, source, stop, duration, snapshot_interval):
    counts = {"events": 0, "uevents": 0, "lost": 0, "snapshots": 0}

    def write_all(records):
        for r in records:
            writer.write(r)
            kind = r["type"]
            counts["events"] += kind == "event"
            counts["uevents"] += kind == "uevent"
            counts["snapshots"] += kind == "snapshot"
            counts["lost"] += r["count"] if kind == "lost" else 0

    next_snapshot = time.monotonic() + snapshot_interval
    end = None if duration is None else time.monotonic() + duration
    while not stop.is_set() and (end is None or time.monotonic() < end):
        write_all(source.poll(0.2))
        if time.monotonic() >= next_snapshot:
            source.read_views()
            next_snapshot = time.monotonic() + snapshot_interval
    source.read_views()
    write_all(source.drain())
    return counts
