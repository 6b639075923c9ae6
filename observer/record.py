"""`memhp-observer record`: a trace (v1) of the hotplug calls the probes see, with snapshots of
the kernel views at start, on a period and at the end, so the trace alone can be replayed."""

import logging
import os
import time

from . import snapshot
from .probes.loader import attach
from .uevents import UeventListener
from .trace import FORMAT, VERSION, TraceWriter

log = logging.getLogger("memhp-observer")
SECTION_SIZE_X86_64 = 1 << 27    # SECTION_SIZE_BITS on x86-64; not exported by the kernel


def snapshot_record(snap):
    doc = snapshot.to_json(snap)
    return {"type": "snapshot", "ts_ns": time.monotonic_ns(), "zones": doc["zones"],
            "memory_blocks": doc["memory_blocks"], "resources": doc["resources"]}


def record(path, stop, duration=None, snapshot_interval=10.0, root="/", strict=False, mode="auto",
           probe_method="auto"):
    """Record until `stop` (a threading.Event) is set or `duration` seconds pass. Returns counts.
    mode: auto (BPF where it attaches, else procfs), bpf (fail unless a probe attaches), procfs
    (no probes: snapshots and memory-block uevents)."""
    writer = TraceWriter(path)   # before anything is attached: a bad path fails first
    probes, uevents = None, None
    try:
        began = time.monotonic()
        probes, status = attach(mode, strict, probe_method) if mode != "procfs" else (None, {})
        attached = {fn: st.method for fn, st in status.items() if st.attached}
        mode = "bpf" if probes else "procfs"   # procfs mode needs neither BTF nor bcc
        uevents = UeventListener()   # memory-block uevents in both modes
        log.info("recording to %s in %s mode: %d of %d functions attached (%.1f s)", path, mode,
                 len(attached), len(status), time.monotonic() - began)
        first = snapshot.take(root)
        writer.write({"type": "header", "format": FORMAT, "version": VERSION,
                      "kernel": first.kernel, "page_size": first.page_size,
                      "section_size": SECTION_SIZE_X86_64 if os.uname().machine == "x86_64" else None,
                      "block_size": first.blocks.block_size, "mode": mode,
                      "start_time_ns": time.time_ns(), "start_monotonic_ns": time.monotonic_ns(),
                      "probes": {fn: {"attached": st.attached,
                                      "method": st.method if st.attached else "none",
                                      "shape": st.shape, "reason": st.reason}
                                 for fn, st in status.items()}})
        writer.write(snapshot_record(first))
        return _record_until(writer, probes, uevents, stop, duration, snapshot_interval, root)
    finally:
        writer.close()
        if writer.lines == 0:
            os.unlink(path)   # the empty file this call created, when nothing could be recorded
        if probes:
            probes.close()
        if uevents:
            uevents.close()


def _record_until(writer, probes, uevents, stop, duration, snapshot_interval, root):
    counts = {"events": 0, "uevents": 0, "lost": 0, "snapshots": 1}
    next_snapshot = time.monotonic() + snapshot_interval
    end = None if duration is None else time.monotonic() + duration

    def write_all(records, lost=0):
        for r in records:
            writer.write(r)
            counts["events"] += r["type"] == "event"
            counts["uevents"] += r["type"] == "uevent"
        if lost:
            writer.write({"type": "lost", "ts_ns": time.monotonic_ns(), "count": lost})
            counts["lost"] += lost

    while not stop.is_set() and (end is None or time.monotonic() < end):
        if probes:
            write_all(*probes.poll(200))
            write_all(uevents.poll(0))
        else:
            write_all(uevents.poll(0.2))
        if time.monotonic() >= next_snapshot:
            writer.write(snapshot_record(snapshot.take(root)))
            counts["snapshots"] += 1
            next_snapshot = time.monotonic() + snapshot_interval
    if probes:
        records, lost = probes.poll(0)
        write_all(records + probes.drain(), lost)
    write_all(uevents.poll(0))
    writer.write(snapshot_record(snapshot.take(root)))
    counts["snapshots"] += 1
    return counts
