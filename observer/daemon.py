"""The live loop (`memhp-observer run`): reconciles from the kernel views on an interval and on
memory-block uevents, checks the view invariants and serves /metrics. In BPF mode the probes are
attached too and their events counted (by function, origin and result); judging state from the
events is the reference model's work.

Reconciles run in a thread of their own: a view that never answers (a hung sysfs read) then
shows as memhp_reconcile_running_seconds growing and one log line, and never keeps SIGTERM from
stopping the daemon."""

import logging
import signal
import threading
import time
from dataclasses import dataclass, field, replace as _replace
from typing import Optional

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

from . import snapshot
from .metrics import StateCollector
from .model.invariants import judge_views
from .snapshot import Snapshot
from .uevents import UeventListener
from .probes.availability import has_kprobes, missing_privilege, try_fentry
from .probes.loader import ProbeError, attach
from .views.source import ViewError

log = logging.getLogger("memhp-observer")
STUCK_SECONDS = 30   # a reconcile running this long is said to be stuck (once per reconcile)


@dataclass(frozen=True)
class State:
    """Everything a scrape shows; replaced whole by each reconcile, never mutated."""
    kernel: str
    mode: str
    probe_methods: dict = field(default_factory=dict)   # function -> kprobe/kfunc; absent = none
    snapshot: Optional[Snapshot] = None
    anomalies: tuple = ()
    anomalies_reported: dict = field(default_factory=dict)  # kind -> count since start
    reconciled_at: float = 0.0
    reconcile_seconds: float = 0.0
    reconcile_errors: int = 0


def _anomaly_key(a):
    return (a.kind, a.node, a.zone, a.start_pfn, a.end_pfn)


def _result(event):
    return "ok" if event["ret"] in (None, 0, "ok") else "error"


class Daemon:
    def __init__(self, root="/", interval=10.0, mode="auto"):
        self.root = root
        self.interval = interval
        self.mode = mode           # auto, bpf or procfs, as asked
        self.stop = threading.Event()
        self.current = None
        self.probes = None
        self._active_keys = set()
        self.uevents = {}          # action -> memory-block uevents seen
        self.events = {}           # (function, origin, result) -> probe events seen
        self.events_lost = 0
        self._due = threading.Event()        # a reconcile is wanted
        self._done = threading.Event()       # set after every reconcile
        self._running_since = None           # monotonic start of the reconcile in progress
        self._stuck_said = None              # _running_since of the reconcile said to be stuck

    def _attach(self):
        """{function: method} of the attached probes; {} in procfs mode. Without kprobes, the
        fentry load is tried in a child first: a refusal then costs the daemon no LLVM."""
        if self.mode == "procfs" or self.root != "/":
            log.info("procfs mode (%s)", "--mode procfs" if self.mode == "procfs" else "--root")
            return {}
        lacking = missing_privilege()
        if lacking:
            if self.mode == "bpf":
                raise ProbeError(f"--mode bpf: {lacking}")
            log.info("BPF off: %s: procfs mode", lacking)
            return {}
        if not has_kprobes():
            loaded, why = try_fentry(timeout=60)
            if not loaded:
                reason = f"no kprobes in this kernel; fentry {why}"
                if self.mode == "bpf":
                    raise ProbeError(f"--mode bpf: {reason}")
                log.info("BPF off: %s: procfs mode", reason)
                return {}
        probes, status = attach(self.mode)
        if probes is None:
            return {}
        attached = {fn: st.method for fn, st in status.items() if st.attached}
        self.probes = probes
        log.info("BPF mode: %d of %d functions attached", len(attached), len(status))
        return attached

    def start(self, host, port):
        """Probes first (one line saying why BPF is off), then the first reconcile, then the
        listener. False when stopped before the first reconcile finished."""
        attached = self._attach()
        kernel = snapshot.read_kernel_release(self.root) or "unknown"
        self.current = State(kernel=kernel, mode="bpf" if attached else "procfs",
                             probe_methods=attached)
        registry = CollectorRegistry()
        registry.register(StateCollector(self))
        ProcessCollector(registry=registry)
        threading.Thread(target=self._reconciler, name="reconcile", daemon=True).start()
        self._due.set()
        while not self._done.wait(0.2):
            if self.stop.is_set():
                if self.probes:
                    self.probes.close()
                return False
            self._say_if_stuck()
        start_http_server(port, addr=host, registry=registry)   # OSError when the port is taken
        log.info("serving /metrics on %s:%d, reconciling every %g s", host, port, self.interval)
        return True

    def _reconciler(self):
        """The reconcile thread: one reconcile each time one is due. A daemon thread, so that
        one blocked in a read never holds up the exit."""
        while True:
            self._due.wait()
            self._due.clear()
            self._running_since = time.monotonic()
            try:
                self.reconcile()
            except Exception as e:   # a bug in a rule must not end reconciling for good
                log.error("reconcile failed: %s: %s", type(e).__name__, e)
                self.current = _replace(self.current,
                                        reconcile_errors=self.current.reconcile_errors + 1)
            finally:
                self._running_since = None
                self._done.set()

    def running_seconds(self):
        """How long the reconcile in progress has run; 0 when none is."""
        since = self._running_since
        return 0.0 if since is None else time.monotonic() - since

    def _say_if_stuck(self):
        since = self._running_since
        if since is not None and since != self._stuck_said \
                and time.monotonic() - since > STUCK_SECONDS:
            self._stuck_said = since
            log.error("a reconcile has run for %d s: a kernel view does not answer; /metrics "
                      "keeps the last complete one (memhp_reconcile_running_seconds)", STUCK_SECONDS)

    def reconcile(self):
        began = time.monotonic()
        try:
            snap = snapshot.take(self.root)
        except (ViewError, OSError) as e:   # OSError: a sysfs race the readers did not foresee
            log.error("reconcile failed: %s", e)
            self.current = _replace(self.current, reconcile_errors=self.current.reconcile_errors + 1)
            return
        if snap.resources is None and (self.current.snapshot is None
                                       or self.current.snapshot.resources is not None):
            log.warning("resource invariants off: %s", snap.iomem_error)
        found = judge_views(snap, time.time_ns())
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
                if self.probes:
                    self._count(*self.probes.poll(int(wait * 1000)))
                    wait = 0
                if listener:
                    seen = listener.poll(wait)
                else:
                    self.stop.wait(wait)
                    seen = []
                for u in seen:
                    self.uevents[u["action"]] = self.uevents.get(u["action"], 0) + 1
                if seen or time.monotonic() >= next_at:
                    self._due.set()    # no second one while one runs: it runs once more after
                    next_at = time.monotonic() + self.interval
                self._say_if_stuck()
        finally:
            if listener:
                listener.close()
            if self.probes:
                self.probes.close()

    def _count(self, records, lost):
        for e in records:
            if e["type"] == "event":
                key = (e["fn"], e["origin"], _result(e))
                self.events[key] = self.events.get(key, 0) + 1
        self.events_lost += lost


def run(host, port, root="/", interval=10.0, mode="auto"):
    """Exit status: 0 after SIGTERM/SIGINT, 1 when the listener cannot start or --mode bpf
    cannot attach."""
    daemon = Daemon(root, interval, mode)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop.set())
    try:
        started = daemon.start(host, port)
    except ProbeError as e:
        log.error("%s", e)
        return 1
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", host, port, e.strerror or e)
        return 1
    if started:
        daemon.loop()
    log.info("stopped")
    return 0
