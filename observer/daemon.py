"""The live loop (`memhp-observer run`): the live source (views read on an interval and on
memory-block uevents, and in BPF mode the probes' events) feeds the reference model, whose
anomalies are logged and, with the state the views show, served on /metrics. With --record
every record the model was fed goes to a trace, which `replay` judges the same way.

Reconciles run in a thread of their own: a view that never answers (a hung sysfs read) then
shows as memhp_reconcile_running_seconds growing and one log line, and never keeps SIGTERM from
stopping the daemon."""

from __future__ import annotations

import bisect
import os
import signal
import threading
import time
from collections import namedtuple

from . import log, snapshot
from .journal import DEFERRED_IMPORTS as JOURNAL_IMPORTS, Journal, JournalError, boot_id, identity
from .journald import (DEFERRED_IMPORTS as JOURNALD_IMPORTS, SOCKET as JOURNALD_SOCKET, Journald,
                       stderr_is_journal)
from .metrics import DURATION_BUCKETS, ProcessCollector, StateCollector, block_counts, serve
from .notify import Notifier
from .model.model import SETTLE_NS, Model
from .model.ranges import RangeMap
from .report import anomaly_headline
from .sources.live import LiveSource
from .trace import TraceWriteError, TraceWriter
from .probes.availability import has_kprobes, missing_privilege, try_fentry
from .probes.loader import ProbeError, attach
from .views.source import ViewError


class ListenError(Exception):
    """The /metrics listener cannot start (the port taken, the address not this host's)."""


STUCK_SECONDS = 30   # a reconcile running this long is said to be stuck (once per reconcile)
# the loop's longest sleep with nothing held: a signal that another thread took waits this long
# for the loop to see it (a 6.12 lab guest's idle BPF-mode daemon: 0.58% of a core at 0.5 s,
# 0.43% at 2 s)
WAKE_SECONDS = 2.0
RECORD_MAX_BYTES = 64 << 20   # --record: a new file at the next read past this (4 kept)


class State(namedtuple("State", [
        "kernel", "mode",
        "probe_methods",        # function -> kprobe/kfunc; absent = none
        "snapshot",             # Snapshot, None before the first read
        "anomalies",
        "anomalies_reported",   # (kind, severity) -> count since start
        "snapshots",            # verdict -> reads the model took
        "reconciled_at", "reconcile_seconds", "reconcile_errors",
        "offline_since",        # RangeMap: block index -> (node, monotonic time first read offline)
        "block_counts",         # metrics.block_counts of the snapshot
        "pagemap_bytes",        # pagemap type -> bytes mapped (BPF mode)
], defaults=({}, None, (), {}, {}, 0.0, 0.0, 0, RangeMap(), {}, {}))):
    """Everything a scrape shows; replaced whole by each reconcile, never mutated (nor are the
    defaults, which every State shares)."""
    __slots__ = ()


def _result(event):
    return "ok" if event["ret"] in (None, 0, "ok") else "error"


def _import_for_anomalies():
    """What the first anomaly needs and a start does not, imported once READY is said: not on
    the start's way, nor in the first anomaly's (a tenth of a second under TCG, which the lab's
    first anomaly waited)."""
    for name in (*JOURNAL_IMPORTS, *JOURNALD_IMPORTS):
        __import__(name)


class Daemon:
    def __init__(self, root="/", interval=10.0, mode="auto", record=None, journal=None,
                 record_max_bytes=None, strict=False, probe_method="auto", compiled=None):
        self.root = root
        self.interval = interval
        self.mode = mode           # auto, bpf or procfs, as asked
        self.probe_method = probe_method   # auto, kprobe or kfunc, as asked
        self.compiled = compiled           # Probes from loader.compile_soon, or None
        self.strict = strict       # no start unless every core probe attaches
        self.record = record       # a trace file of everything the model was fed, or None
        self.record_max_bytes = record_max_bytes or RECORD_MAX_BYTES
        self.journal_path = journal
        self.journal = None        # the anomaly journal (--journal), or None
        self.journald = None       # structured entries where journald listens, or None
        self.stderr_is_journal = False   # then an entry journald took is not logged again
        self.reported = {}         # (kind, severity) -> anomalies this process reported
        self.stop = threading.Event()
        self.reopen = threading.Event()   # SIGHUP: reopen the journal and the record
        self.notifier = Notifier()         # systemd's notify socket, when it runs us
        self.mode_said = ""
        self.current = None
        self.source = None
        self.model = Model()
        self.writer = None
        self.first = None          # the first Snapshot read: the trace header comes from it
        self._held = []            # records that came before the header could be made
        self.uevents = {}          # action -> memory-block uevents seen
        self.events = {}           # (function, origin, result) -> probe events seen
        self.durations = {}        # function -> [count per bucket (+Inf last), sum of seconds]
        self.events_lost = 0
        self._lock = threading.Lock()        # State is replaced by both threads
        self._due = threading.Event()        # a reconcile is wanted
        self._done = threading.Event()       # set after every reconcile
        self._running_since = None           # monotonic start of the reconcile in progress
        self._stuck_said = None              # _running_since of the reconcile said to be stuck

    def _update(self, **changes):
        with self._lock:
            self.current = self.current._replace(**changes)

    def _attach(self):
        """(Probes, status of every function), or (None, {}) in procfs mode. Without kprobes,
        the fentry load is tried in a child first: a refusal then costs the daemon no LLVM."""
        if self.mode == "procfs" or self.root != "/":
            self._say_mode(f"procfs mode ({'--mode procfs' if self.mode == 'procfs' else '--root'})")
            return None, {}
        required = "--mode bpf" if self.mode == "bpf" else "--strict" if self.strict else None
        lacking = missing_privilege()
        if lacking:
            if required:
                raise ProbeError(f"{required}: {lacking}")
            self._say_mode(f"BPF off: {lacking}: procfs mode")
            return None, {}
        if self.probe_method == "auto" and not has_kprobes():
            loaded, why = try_fentry(timeout=60)
            if not loaded:
                reason = f"no kprobes in this kernel; fentry {why}"
                if required:
                    raise ProbeError(f"{required}: {reason}")
                self._say_mode(f"BPF off: {reason}: procfs mode")
                return None, {}
        # says itself why, when nothing attaches
        probes, status = attach(self.mode, self.strict, self.probe_method, self.compiled)
        if probes is None:
            self.mode_said = "procfs mode: no probe attached"
            return None, {}
        self._say_mode(f"BPF mode: {sum(st.attached for st in status.values())} of "
                       f"{len(status)} functions attached")
        return probes, status

    def _say_mode(self, sentence):
        """The one line on the mode, for the log and for systemd's STATUS."""
        log.info("%s", sentence)
        self.mode_said = sentence

    def start(self, host, port):
        """Probes first (one line saying why BPF is off), then the first reconcile, then the
        listener. False when stopped before the first reconcile finished."""
        if self.record:
            # a bad path fails before anything loads
            self.writer = TraceWriter(self.record, max_bytes=self.record_max_bytes)
        if self.journal_path:
            self.journal = Journal(self.journal_path, boot_id())
            if self.journal.open_ids:
                log.info("journal %s: %d anomalies open from earlier in this boot: found again, "
                         "they are the same ones", self.journal_path, len(self.journal.open_ids))
        if os.path.exists(JOURNALD_SOCKET):
            self.journald = Journald()
            self.stderr_is_journal = stderr_is_journal()
        probes, status = self._attach()
        self.source = LiveSource(self.root, probes, status)
        kernel = snapshot.read_kernel_release(self.root) or "unknown"
        self.current = State(kernel=kernel, mode=self.source.mode,
                             probe_methods={fn: st.method for fn, st in status.items()
                                            if st.attached})
        collectors = [StateCollector(self), ProcessCollector()]
        threading.Thread(target=self._reconciler, name="reconcile", daemon=True).start()
        self._due.set()
        while not self._done.wait(0.2):
            if self.stop.is_set():
                self.source.close()
                return False
            self._say_if_stuck()
        try:
            serve(host, port, collectors)
        except OSError as e:
            raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        # probes attached (or deliberately not) and the first read taken: ready
        self.notifier.send(READY=1, STATUS=f"{self.mode_said}; serving /metrics on {host}:{port}")
        log.info("serving /metrics on %s:%d, reconciling every %g s", host, port, self.interval)
        threading.Thread(target=_import_for_anomalies, name="imports", daemon=True).start()
        return True

    def _reconciler(self):
        """The reconcile thread: one read of the views each time one is due. A daemon thread,
        so that one blocked in a read never holds up the exit."""
        while True:
            self._due.wait()
            self._due.clear()
            self._running_since = time.monotonic()
            try:
                self.reconcile()
            except Exception as e:   # a bug in a reader must not end reconciling for good
                log.error("reconcile failed: %s: %s", type(e).__name__, e)
                self._update(reconcile_errors=self.current.reconcile_errors + 1)
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
        """Read the views; the snapshot goes to the model through the source, in order."""
        began = time.monotonic()
        try:
            snap = self.source.read_views()
        except (ViewError, OSError) as e:   # OSError: a sysfs race the readers did not foresee
            log.error("reconcile failed: %s", e)
            self._update(reconcile_errors=self.current.reconcile_errors + 1)
            return
        if snap.resources is None and (self.current.snapshot is None
                                       or self.current.snapshot.resources is not None):
            log.warning("resource invariants off: %s", snap.iomem_error)
        self.first = self.first or snap
        last = self.current.snapshot
        if last is not None and last.blocks is snap.blocks:
            counts, offline = self.current.block_counts, self.current.offline_since   # unchanged
        else:
            counts, offline = block_counts(snap.blocks), RangeMap()
            for r in snap.blocks.runs:
                if r.state == "offline":   # since it was first read offline, or now
                    offline.assign(r.first, r.last + 1, (r.node, time.monotonic()))
                    for lo, hi, since in self.current.offline_since.items(r.first, r.last + 1):
                        offline.assign(lo, hi, since)
        self._update(snapshot=snap, block_counts=counts, reconciled_at=time.time(),
                     reconcile_seconds=time.monotonic() - began, offline_since=offline)

    def loop(self):
        """Feed the model what the source puts out; reconcile every interval, and soon after a
        memory block is added, removed, onlined or offlined (its uevent): at once, and again
        once the uevents have settled, so that two reads can agree (procfs mode judges so).
        Through a burst of uevents (a DIMM's blocks onlined, a test cycling one) it reads once
        a settle time at most: a read while hotplug runs is not judged, and each one takes
        locks and CPU the hotplug in progress would use."""
        settle = SETTLE_NS * 1.5 / 1e9
        next_at = time.monotonic() + min(self.interval, settle)
        last_uevent = float("-inf")
        pinged = 0.0
        try:
            while not self.stop.is_set():
                # systemd's watchdog is fed from this loop: if it stops turning, systemd
                # restarts the daemon
                if self.notifier.watchdog_seconds and \
                        time.monotonic() - pinged >= self.notifier.watchdog_seconds:
                    self.notifier.send(WATCHDOG=1)
                    pinged = time.monotonic()
                if self.reopen.is_set():
                    self.reopen.clear()
                    self._reopen_journal()
                    if self.writer:
                        self.writer.reopen()
                # soon while the source holds records back for their turn (it comes by time);
                # else until the next read, at most WAKE_SECONDS (how late a signal may be seen)
                wake = 0.5 if self.source.holding() else WAKE_SECONDS
                wait = max(0.0, min(next_at - time.monotonic(), wake))
                records = self.source.poll(wait)
                self._take(records)
                now = time.monotonic()
                if any(r["type"] == "uevent" for r in records):
                    if now - last_uevent >= settle:   # a burst begins
                        self._due.set()   # no second one while one runs: it runs once more after
                    last_uevent = now
                    next_at = min(next_at, now + settle)
                if now >= next_at:
                    self._due.set()
                    # in a burst, again once a settle time has passed since its last uevent
                    # (later ones do not put that off: see above); then at the interval
                    quiet_at = last_uevent + settle
                    next_at = quiet_at if now < quiet_at else now + self.interval
                self._say_if_stuck()
        finally:
            self.notifier.send(STOPPING=1)
            self._take(self.source.drain())
            self._judge_held()
            self.source.close()
            if self.writer:
                self.writer.close()
            if self.journal:
                self.journal.close()
            if self.journald:
                self.journald.close()

    def _take(self, records):
        """Count, record and judge records, in order; the header first, once a read made it."""
        if self.model.header is None:
            if self.first is None:
                self._held += records
                return
            records = [self.source.header(self.first)] + self._held + records
            self._held = []
        found = []
        for rec in records:
            self._count(rec)
            self._write(rec)
            try:
                found += self.model.feed(rec)
            except Exception as e:   # a bug in a rule must not end judging for good
                log.error("the model failed on a %s record: %s: %s", rec["type"],
                          type(e).__name__, e)
                self._update(reconcile_errors=self.current.reconcile_errors + 1)
        self._report(found)
        if records:
            page = self.model.header["page_size"]
            mapped = {}
            for pgmap in self.model.pagemaps.values():
                pages = sum(hi - lo for lo, hi in pgmap["ranges"])
                mapped[pgmap["type"]] = mapped.get(pgmap["type"], 0) + pages * page
            self._update(anomalies=tuple(self.model.active.values()),
                         anomalies_reported=dict(self.reported),
                         snapshots=dict(self.model.snapshots), pagemap_bytes=mapped)

    def _judge_held(self):
        """At the end, as replay does at the end of the trace: the reads still held."""
        if self.model.header is not None:
            self._report(self.model.finish())

    def _report(self, found):
        """Each anomaly into the journal first (durably), then journald and the log. One the
        journal holds open from before a restart is not said again."""
        for a in found:
            if self.journal is not None:
                if self.journal.known(a):
                    continue
                try:
                    self.journal.report(a)
                except OSError as e:
                    log.error("journal %s: %s: the anomaly below is only in this log",
                              self.journal_path, e.strerror or e)
            sent = self.journald is not None and self.journald.send(a, identity(a))
            if not (sent and self.stderr_is_journal):
                log.warning("%s", anomaly_headline(a))
            key = (a.kind, a.severity)
            self.reported[key] = self.reported.get(key, 0) + 1
        cleared, self.model.cleared = self.model.cleared, []
        if self.journal is not None:
            for a, ts in cleared:
                try:
                    self.journal.clear(a, ts)
                except OSError as e:
                    log.error("journal %s: %s", self.journal_path, e.strerror or e)

    def _reopen_journal(self):
        if self.journal is None:
            return
        try:
            self.journal.reopen()
            log.info("journal %s reopened", self.journal_path)
        except JournalError as e:
            log.error("%s: anomalies go to the log only", e)
            self.journal = None

    def _write(self, rec):
        if self.writer is None:
            return
        try:
            self.writer.write(rec)
        except TraceWriteError as e:
            log.error("recording stopped: %s", e)
            self.writer.close()
            self.writer = None

    def _count(self, rec):
        kind = rec["type"]
        if kind == "event":
            key = (rec["fn"], rec["origin"], _result(rec))
            self.events[key] = self.events.get(key, 0) + 1
            seconds = (rec.get("duration_ns") or 0) / 1e9
            counts = self.durations.setdefault(rec["fn"], [0] * (len(DURATION_BUCKETS) + 1) + [0.0])
            counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1   # first le >= seconds
            counts[-1] += seconds
        elif kind == "uevent":
            self.uevents[rec["action"]] = self.uevents.get(rec["action"], 0) + 1
        elif kind == "lost":
            self.events_lost += rec["count"]


def run(host, port, root="/", interval=10.0, mode="auto", record=None, journal=None,
        record_max_bytes=None, strict=False, probe_method="auto", compiled=None):
    """Exit status: 0 after SIGTERM/SIGINT, 1 when the listener cannot start, --mode bpf
    cannot attach, --strict misses a core probe, or the --record or --journal file cannot be
    made. compiled: Probes from loader.compile_soon, begun before this module was imported."""
    daemon = Daemon(root, interval, mode, record, journal, record_max_bytes, strict, probe_method,
                    compiled)
    handlers = {signal.SIGTERM: lambda *_: daemon.stop.set(),
                signal.SIGINT: lambda *_: daemon.stop.set(),
                signal.SIGHUP: lambda *_: daemon.reopen.set()}
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, handlers)   # cmd_run held them until now
    try:
        started = daemon.start(host, port)
    except (ProbeError, TraceWriteError, JournalError, ListenError) as e:
        log.error("%s", e)
        return 1
    if started:
        daemon.loop()
    log.info("stopped")
    return 0
