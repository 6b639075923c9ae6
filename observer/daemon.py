"""The live loop (`memhp-observer run`). Today: procfs mode, reconciling from the kernel views on
an interval, checking the view invariants and serving /metrics. BPF events join in the probes
issue."""

import logging
import signal
import threading
import time
from dataclasses import dataclass, field, replace as _replace
from typing import Optional

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

from . import check, snapshot
from .metrics import StateCollector
from .snapshot import Snapshot
from .uevents import UeventListener
from .probes.availability import bpf_status
from .views.source import ViewError

log = logging.getLogger("memhp-observer")


@dataclass(frozen=True)
class State:
    """Everything a scrape shows; replaced whole by each reconcile, never mutated."""
    kernel: str
    mode: str
    page_size: int
    probe_methods: dict = field(default_factory=dict)   # function -> kprobe/kfunc; absent = none
    snapshot: Optional[Snapshot] = None
    anomalies: tuple = ()
    anomalies_reported: dict = field(default_factory=dict)  # kind -> count since start
    reconciled_at: float = 0.0
    reconcile_seconds: float = 0.0
    reconcile_errors: int = 0


def _anomaly_key(a):
    return (a.kind, a.node, a.zone, a.start_pfn, a.end_pfn)


class Daemon:
    def __init__(self, root="/", interval=10.0):
        self.root = root
        self.interval = interval
        self.stop = threading.Event()
        self.current = None
        self._active_keys = set()
        self.uevents = {}          # action -> memory-block uevents seen

    def start(self, host, port):
        """BPF status first (one line saying why it is off), then the listener, then the loop."""
        status = bpf_status()
        if status.available:
            # `record` uses the probes; the daemon's events and their metrics come with the model
            log.info("%s, but the daemon does not use probes yet (`record` does): procfs mode",
                     status.reason)
        else:
            log.info("%s: procfs mode", status.reason)
        kernel = snapshot.read_kernel_release(self.root) or "unknown"
        self.current = State(kernel=kernel, mode="procfs", page_size=snapshot.PAGE_SIZE)
        registry = CollectorRegistry()
        registry.register(StateCollector(self))
        ProcessCollector(registry=registry)
        self.reconcile()
        start_http_server(port, addr=host, registry=registry)   # OSError when the port is taken
        log.info("serving /metrics on %s:%d, reconciling every %g s", host, port, self.interval)

    def reconcile(self):
        began = time.monotonic()
        try:
            snap = snapshot.take(self.root)
        except (ViewError, OSError) as e:   # OSError: a sysfs race the readers did not foresee
            log.error("reconcile failed: %s", e)
            self.current = _replace(self.current, reconcile_errors=self.current.reconcile_errors + 1)
            return
        found = []
        if snap.resources is None:
            if self.current.snapshot is None or self.current.snapshot.resources is not None:
                log.warning("resource invariants off: %s", snap.iomem_error)
            found = check.span_leaks(snap.zones, snap.blocks, snapshot.PAGE_SIZE, time.time_ns())
        else:
            found = check.check(snap, snapshot.PAGE_SIZE, time.time_ns())
        reported = dict(self.current.anomalies_reported)
        keys = set()
        for a in found:
            keys.add(_anomaly_key(a))
            if _anomaly_key(a) not in self._active_keys:
                reported[a.kind] = reported.get(a.kind, 0) + 1
                log.warning("%s %s: %s", a.severity, a.kind, a.message)
        self._active_keys = keys
        self.current = _replace(self.current, snapshot=snap, anomalies=tuple(found),
                                anomalies_reported=reported, reconciled_at=time.time(),
                                reconcile_seconds=time.monotonic() - began)

    def loop(self):
        """Reconcile every interval, and at once when a memory block is added, removed,
        onlined or offlined (its uevent), so a change shows without waiting for the interval."""
        listener = UeventListener() if self.root == "/" else None
        next_at = time.monotonic() + self.interval
        try:
            while not self.stop.is_set():
                wait = max(0.0, min(next_at - time.monotonic(), 0.5))
                if listener:
                    seen = listener.poll(wait)
                else:
                    self.stop.wait(wait)
                    seen = []
                for u in seen:
                    self.uevents[u["action"]] = self.uevents.get(u["action"], 0) + 1
                if seen or time.monotonic() >= next_at:
                    self.reconcile()
                    next_at = time.monotonic() + self.interval
        finally:
            if listener:
                listener.close()


def run(host, port, root="/", interval=10.0):
    """Exit status: 0 after SIGTERM/SIGINT, 1 when the listener cannot start."""
    daemon = Daemon(root, interval)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop.set())
    try:
        daemon.start(host, port)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", host, port, e.strerror or e)
        return 1
    daemon.loop()
    log.info("stopped")
    return 0
