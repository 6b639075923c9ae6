"""The reference model (DESIGN.md §3): trace records in, in the order the trace holds them,
anomalies out. Pure: no I/O and no clock (every time is a record's ts_ns), so `run`, which
feeds it the live source, and `replay`, which feeds it a file, report the same things.

What it knows, and from where:
- The kernel views (snapshot records) are the truth about state, and a snapshot is judged only
  when it is settled: nothing that could explain a difference was in flight while it was read.
  Hotplug takes seconds and the views change piece by piece (a block is `going-offline` before
  its zone shrinks; try_remove_memory removes the blocks before it releases the resource;
  zoneinfo and the blocks are read at different instants), so: no probed call ran during the
  read (from the calls' entry time and duration, or their `begun` record), no block was
  between states, no memory-block uevent came during the read; in procfs mode, where calls are
  unseen, uevents were quiet for SETTLE_NS before it and it reads the same as the one before.
- Events (BPF mode) say what each call did, and the rules about one call are judged on it: a
  span that an offline at its edge left wide, present pages moved by other than the pages
  onlined, a remove of what is not there, a call that failed.
- Memory that was there and went (a block in one judged snapshot and not in a later one) is
  remembered: a System RAM resource still over it is a leak even where other blocks keep the
  rest of the resource alive, and a zone edge on it is a span that never shrank."""

import errno

from ..formats import RecordError, snapshot_from_record
from .anomaly import INFO, Anomaly
from .invariants import DEVICE_ZONE, judge_views
from .ranges import BlockMap, RangeSet, pfns_of

SETTLE_NS = 1_000_000_000   # procfs mode: uevents quiet this long before a read that is judged
HOLD_NS = 2_000_000_000     # a snapshot record without calls_before (older traces) is judged once
                            # the trace is this far past its read: every call begun before it is in
SUBSECTION_BYTES = 2 << 20  # ZONE_DEVICE adds go by subsection (kernel-reference.md §2)


OK_RETS = (0, "ok", None)   # what a call that succeeded returns, as a trace says it


def _ok(event):
    return event["ret"] in OK_RETS


def _errno(ret):
    if isinstance(ret, int) and ret < 0:
        return f"-{errno.errorcode.get(-ret, str(-ret))}"
    return str(ret)


MAX_PFN = 1 << 52             # 2^64 bytes of 4 KiB pages: no kernel event goes past it


def _pfns(event):
    """[first, end) pfns of an event."""
    lo, n = event["start_pfn"], event["nr_pages"]
    if not (type(lo) is int and type(n) is int and 0 <= lo and 0 < n and lo + n <= MAX_PFN):
        raise RecordError(f"pfn range {lo!r} + {n!r} is not one a kernel calls with")
    return lo, lo + n


def _say(event):
    """An event as evidence: one line."""
    where = ""
    lo, n = event.get("start_pfn"), event.get("nr_pages")
    if isinstance(lo, int) and isinstance(n, int):
        where = f" pfn {lo:#x}-{lo + n:#x}"
    zone = f" zone {event['zone']}" if event.get("zone") else ""
    return (f"event seq {event['seq']} at {event['ts_ns']} ns: {event['fn']}{where}{zone} -> "
            f"{event['ret']} ({event['comm']}, {event['origin']}, from {event['caller']})")


def _blocked(page):
    """(the cause in words, the evidence line) of an offline's `blocked_by`, or (None, None)."""
    if page is None:
        return None, None
    if not (isinstance(page, dict) and isinstance(page.get("reason"), str)
            and isinstance(page.get("flags"), list) and all(isinstance(f, str) for f in page["flags"])
            and isinstance(page.get("refcount"), int) and isinstance(page.get("pages_named"), int)
            and (page.get("pfn") is None or isinstance(page["pfn"], int))):
        raise RecordError(f"blocked_by {page!r} is not a page as dump_page names it")
    which = f"pfn {page['pfn']:#x}" if page["pfn"] is not None else f"the page at {page.get('page')}"
    more = f"; {page['pages_named'] - 1} more named after it" if page["pages_named"] > 1 else ""
    cause = (f"the kernel named {which} ('{page['reason']}'; flags "
             f"{'|'.join(page['flags']) or 'none'}; refcount {page['refcount']}{more})")
    return cause, f"dump_page during the call: {page}"


def _no_handler(event, judge):
    return []


def _span(span):
    return span["start_pfn"], span["start_pfn"] + span["spanned"]


class Model:
    def __init__(self):
        self.header = None
        self.per_block = None
        self.pending = []          # (record, Snapshot) waiting for the trace to pass their read
        self.previous = None       # the content of the snapshot record before (procfs mode)
        self.quiet = None          # the content of the last judged read, while no other record
                                   # has come since: a read the same is judged the same
        self.judged = None         # the last judged Snapshot
        self.baseline_end = None   # ts_ns of the first snapshot: events before it are its past
        self.baseline_edges = {}   # (node, zone) -> (start, end) in the first judged snapshot
        self.removed = RangeSet()  # pfns of System RAM removed (events; blocks judged, then gone)
        self.was_online = {}       # (node, zone) -> RangeSet of the blocks seen online in it
        self.blocks_at_start = None  # RangeSet of the first judged snapshot's blocks still there
        self.removals = {}         # first pfn of a removed System RAM range -> its event
        self.calls = []            # (entry ts, return ts) of calls since the last judged read
        self.in_flight = {}        # seq -> (entry ts, function, tid) of calls begun, not returned
        self.uevent_times = []     # ts of memory-block uevents not older than a judged read
        self.sure = False          # every call since the last rebase was seen (none lost)
        self.expected = None       # BlockMap: block index -> (state, zone) the events say, or None
        self.present = RangeSet()  # pfns with sections present (blocks and adds seen)
        self.gone = RangeSet()     # pfns whose sections a remove took, not added again since
        self.claimed = RangeSet()  # pfns some iomem resource claims (a pagemap may be there)
        self.pagemaps = {}         # pgmap pointer -> {"type", "ranges", "event", "owner"}
        self.unmapped = {}         # pgmap pointer -> the event that unmapped it, until remapped
        self.pagemap_calls = []    # (end ns, pfn ranges) of memremap/memunmap_pages calls that
                                   # may still be running (see _in_pagemap_call)
        self.stale_said = set()    # Device zone ranges said stale
        self.active = {}           # key -> anomaly, found in the last judged snapshot
        self.cleared = []          # (anomaly, ts_ns) no longer found by a judged read: taken by
                                   # whoever keeps anomalies open (the journal)
        self.reported = {}         # (kind, severity) -> count of anomalies reported
        self.snapshots = {"judged": 0, "unsettled": 0}
        self.last_unsettled = ""   # why the last snapshot was not judged
        self._handlers = {}        # function -> its _on_ method (replay looks one up per event)

    # --- the stream ---------------------------------------------------------------------------

    def feed(self, rec):
        """One trace record; the anomalies it makes known (each reported once)."""
        kind = rec["type"]
        if kind == "header":
            self._header(rec)
            return []
        if self.header is None:
            raise ValueError("a record before the trace header")
        if kind != "snapshot":
            self.quiet = None
        out = []
        if kind != "skipped":   # every other record has a time, kept for later comparisons
            ts = rec["ts_ns"]
            if type(ts) is not int or ts < 0:
                raise RecordError(f"ts_ns {ts!r} is not a CLOCK_MONOTONIC time in ns")
            if self.pending and kind != "lost":
                out = self._judge_held(ts)
        # most of a trace is events and their uevents
        if kind == "event":
            out += self._event(rec)
        elif kind == "uevent":
            self.uevent_times.append(ts)
        elif kind == "snapshot":
            out += self._snapshot(rec)
        elif kind == "begun":
            self.in_flight[rec["seq"]] = (ts, rec.get("fn"), rec.get("tid"))
        elif kind in ("lost", "skipped"):
            out += self._lost(rec)
        return self._report(out) if out else out

    def finish(self):
        """At the end of a trace: the snapshots still held are judged."""
        out = []
        while self.pending:
            out += self._judge(*self.pending.pop(0))
        return self._report(out)

    def _header(self, rec):
        self.header = rec
        self.per_block = rec["block_size"] // rec["page_size"]
        probes = rec.get("probes") or {}
        attached = {fn for fn, st in probes.items() if st.get("attached")}
        self.adds_at = next((fn for fn in ("add_pages", "arch_add_memory") if fn in attached), None)
        self.maps_at = next((fn for fn in ("memremap_pages", "devm_memremap_pages")
                             if fn in attached), None)
        # what the events must say for the model to know every block's state
        self.follows_blocks = bool(self.adds_at) and {"online_pages", "offline_pages",
                                                      "__remove_pages"} <= attached
        # an offline refused over a page names it through dump_page (an annotation of the call)
        self.pages_named = "dump_page" in attached
        # the span shrinks at offline since 5.5, the release that added remove_pfn_range_from_zone
        lacks = probes.get("remove_pfn_range_from_zone", {}).get("reason", "")
        self.shrinks_at_offline = not lacks.startswith("not in BTF")
        # the end of the physical address space (pfn), where the header says it (x86)
        bits = rec.get("address_bits")
        if bits is not None and not (isinstance(bits, dict) and isinstance(bits.get("physical"), int)
                                     and isinstance(bits.get("max_physmem"), int)
                                     and isinstance(bits.get("line"), str)):
            raise RecordError(f"address_bits {bits!r} is not {{physical, max_physmem, line}}")
        self.physical_end = bits and (
            min(1 << bits["physical"], 1 << bits["max_physmem"]) // rec["page_size"], bits)

    def _report(self, anomalies):
        for a in anomalies:
            key = (a.kind, a.severity)
            self.reported[key] = self.reported.get(key, 0) + 1
        return anomalies

    # --- snapshots ----------------------------------------------------------------------------

    def _snapshot(self, rec):
        """Read (and checked) when it comes, judged now or once the trace is past it."""
        start, calls = rec.get("read_start_ns", rec["ts_ns"]), rec.get("calls_before")
        if not isinstance(start, int) or not 0 <= start <= rec["ts_ns"] or \
                not (calls is None or isinstance(calls, int) and calls >= 0):
            raise RecordError(f"read_start_ns {start!r} or calls_before {calls!r} out of place")
        if calls is not None and not self.pending and self.quiet is not None and \
                _content(rec) == self.quiet:
            # nothing came since a read the same was judged: no rule can say otherwise now
            self.previous = self.quiet
            self.snapshots["judged"] += 1
            return []
        snap = snapshot_from_record(rec, self.header)
        if self.baseline_end is None:
            self.baseline_end = rec["ts_ns"]
            # every call from here on is seen: the probes were attached before this read
            self._rebase(snap)
        if calls is not None:
            # every call begun before the read is already in: judge it now
            return self._judge(rec, snap)
        self.pending.append((rec, snap))
        return []

    def _judge_held(self, now):
        out = []
        while self.pending and now >= self.pending[0][0]["ts_ns"] + HOLD_NS:
            out += self._judge(*self.pending.pop(0))
        return out

    def _unsettled(self, snap, rec, content, previous):
        """Why this snapshot cannot be judged, or "" when it can."""
        r0, r1 = rec.get("read_start_ns", rec["ts_ns"]), rec["ts_ns"]
        if r0 < self.header.get("start_monotonic_ns", 0) + SETTLE_NS:
            return "read as the observer began: an operation begun before it is unseen"
        moving = [r for r in snap.blocks.runs if r.state not in ("online", "offline")]
        if moving:
            return f"memory block {moving[0].first} is {moving[0].state}"
        running = [seq for seq, (ts, _, _) in self.in_flight.items() if ts < r1]
        if running:
            return f"call seq {running[0]} was running"
        if any(ts < r1 and end > r0 for ts, end in self.calls):
            return "a probed call ran while the views were read"
        quiet_since = r0 - SETTLE_NS if self.header["mode"] == "procfs" else r0
        if any(quiet_since <= ts <= r1 for ts in self.uevent_times):
            return "memory-block uevents came while the views were read" \
                if self.header["mode"] != "procfs" else \
                f"memory-block uevents came within {SETTLE_NS / 1e9:g} s of the read"
        if self.header["mode"] == "procfs" and content != previous:
            return "the views changed since the read before"
        return ""

    def _judge(self, rec, snap):
        content = _content(rec)
        previous, self.previous, self.quiet = self.previous, content, None
        why = self._unsettled(snap, rec, content, previous)
        r1 = rec["ts_ns"]
        # the model's state is of this read only if no call came after it (a held snapshot)
        moved = bool(self.calls) and max(self.calls)[0] >= r1
        # what ended before this read cannot touch the reads after it
        self.calls = [(ts, end) for ts, end in self.calls if end >= r1]
        self.uevent_times = [ts for ts in self.uevent_times if ts >= r1 - SETTLE_NS]
        if why:
            self.snapshots["unsettled"] += 1
            self.last_unsettled = why
            return []
        self.snapshots["judged"] += 1
        self._remember_removed(snap)
        if self.blocks_at_start is None:
            self.blocks_at_start = _indexes(snap)
        for r in snap.blocks.runs:
            if r.zone:
                self.was_online.setdefault((r.node, r.zone), RangeSet()).add(r.first, r.last + 1)
        found = judge_views(snap, r1, self._was_online) + self._removed_rules(snap, r1)
        if not moved:
            found += self._pagemap_rules(snap, r1) + self._drift(snap, r1)
            self._rebase(snap)
            self.quiet = content
        else:   # the events have taken the model past this read: those rules keep their word
            found += [a for a in self.active.values() if a.kind in ("pagemap_leak", "model_drift")]
        self.judged = snap
        now = {self._key(a): a._replace(standing=True) for a in found}
        new = [a for key, a in now.items() if key not in self.active]
        self.cleared += [(a, r1) for key, a in self.active.items() if key not in now]
        self.active = now
        return new

    def _was_online(self, index, zone):
        """Seen online in the zone, or there before the model was (no history to go by)."""
        return index in self.was_online.get((zone.node, zone.name), ()) or \
            index in self.blocks_at_start

    @staticmethod
    def _key(a):
        return (a.kind, a.node, a.zone, a.start_pfn, a.end_pfn)

    def _rebase(self, snap):
        """State from a snapshot: the blocks the events will move, the sections present and
        the physical ranges some resource claims. zoneinfo hides the Device zone's start (it
        has no present page), so pagemaps mapped before the trace are known only as claimed."""
        per_block, page = self.per_block, snap.page_size
        present = RangeSet.of_sorted((r.first * per_block, (r.last + 1) * per_block)
                                     for r in snap.blocks.runs)
        for pgmap in self.pagemaps.values():
            for lo, hi in pgmap["ranges"]:
                present.add(lo, hi)
        self.present = present
        if snap.resources is not None:
            # a PCI bus window claims the whole range it may route, owned or not
            self.claimed = RangeSet(pfns_of(r.start, r.end, page)
                                    for r, _ in _walk(snap.resources)
                                    if not r.name.startswith("PCI Bus"))
        self.expected = _states(snap) if self.follows_blocks else None
        self.sure = True
        if not self.baseline_edges:
            self.baseline_edges = {(z.node, z.name): (z.start_pfn, z.end_pfn)
                                   for z in snap.zones if z.spanned}

    def _remember_removed(self, snap):
        per_block = self.per_block
        now = _indexes(snap)
        if self.judged is not None:
            for lo, hi in _indexes(self.judged):
                for a, b in now.gaps(lo, hi):     # blocks gone since the last judged read
                    self.removed.add(a * per_block, b * per_block)
                    self.blocks_at_start.remove(a, b)
        if len(self.removed):   # memory back where it had been removed
            for a, b in now:
                self.removed.remove(a * per_block, b * per_block)

    def _removal_evidence(self, lo, hi):
        out = [_say(e) for start, e in self.removals.items() if lo <= start < hi]
        return out[:2] or [f"memory blocks {lo // self.per_block}..{(hi - 1) // self.per_block} "
                           f"were in an earlier snapshot and are gone"]

    def _removed_rules(self, snap, ts):
        """A resource or a zone edge still on memory that was removed."""
        if not len(self.removed):
            return []
        out = []
        page = snap.page_size
        for r, _ in _walk(snap.resources or []):
            if not r.is_system_ram:
                continue
            lo, hi = pfns_of(r.start, r.end, page)
            gone = self.removed.overlap(lo, hi)
            if not gone or gone == [(lo, hi)]:
                continue   # wholly removed: the view rule says so ("no memory block under it")
            a, b = gone[0][0], gone[-1][1]
            out.append(Anomaly(
                "resource_leak", ts_ns=ts, start_pfn=a, end_pfn=b,
                message=f"{r.name!r} {r.start:#x}-{r.end:#x} still covers "
                        f"{a * page:#x}-{b * page - 1:#x}, whose memory was removed: that part "
                        f"of the resource was not released",
                evidence=[f"/proc/iomem:{r.line} {r.start:x}-{r.end:x} : {r.name}"]
                + self._removal_evidence(a, b)))
        for z in snap.zones:
            if z.name == DEVICE_ZONE or not z.spanned or z.start_pfn is None:
                continue
            was = self.baseline_edges.get((z.node, z.name))
            for edge, pfn in (("start", z.start_pfn), ("end", z.end_pfn - 1)):
                if pfn in self.removed and (was is None or was[0 if edge == "start" else 1]
                                            != (z.start_pfn if edge == "start" else z.end_pfn)):
                    a, b = self.removed.range_at(pfn)
                    a, b = max(a, z.start_pfn), min(b, z.end_pfn)
                    out.append(Anomaly(
                        "zone_span_leak", ts_ns=ts, node=z.node, zone=z.name, start_pfn=a,
                        end_pfn=b,
                        message=f"zone {z.name} of node {z.node} still spans pfn {a:#x}-{b:#x} "
                                f"at its {edge}, memory that was removed: the span did not "
                                f"shrink",
                        evidence=[f"/proc/zoneinfo:{z.line} Node {z.node}, zone {z.name}: "
                                  f"start_pfn {z.start_pfn:#x}, spanned {z.spanned}"]
                        + self._removal_evidence(a, b)))
        return out

    def _pagemap_rules(self, snap, ts):
        """A pagemap still mapped after the resource that owned its range went."""
        if snap.resources is None:
            return []
        page = snap.page_size
        out = []
        resources = [r for r, _ in _walk(snap.resources)]
        for ptr, pgmap in self.pagemaps.items():
            lo, hi = pgmap["ranges"][0]
            owners = [r for r in resources if r.start <= lo * page and (r.end + 1) >= hi * page]
            if pgmap["owner"] is None:
                if owners:   # the innermost resource over it
                    owner = min(owners, key=lambda r: r.size)
                    pgmap["owner"] = (owner.start, owner.end, owner.name)
                continue
            if any((r.start, r.end, r.name) == pgmap["owner"] for r in owners):
                continue
            start, end, name = pgmap["owner"]
            out.append(Anomaly(
                "pagemap_leak", ts_ns=ts, start_pfn=lo, end_pfn=hi,
                message=f"the {pgmap['type']} pagemap {ptr} over pfn {lo:#x}-{hi:#x} is still "
                        f"mapped, but {name!r} {start:#x}-{end:#x} that owned it is gone",
                evidence=[_say(pgmap["event"]), f"/proc/iomem: no {name!r} {start:x}-{end:x}"]))
        return out

    def _drift(self, snap, ts):
        """The blocks the events said against the blocks the kernel shows."""
        if self.expected is None or not self.sure:
            return []
        # an online block whose zone one side does not know (an event before 5.12, a block
        # across several zones) is not told apart by its zone
        differ = [(lo, hi, said, seen) for lo, hi, said, seen in self.expected.diff(_states(snap))
                  if not (said and seen and said[0] == seen[0] == "online" and
                          None in (said[1], seen[1]))]
        if not differ:
            return []
        count = sum(hi - lo for lo, hi, _, _ in differ)
        said = [f"memory{i}: events say {e or 'absent'}, the kernel shows {k or 'absent'}"
                for lo, hi, e, k in differ for i in range(lo, min(hi, lo + 4))][:4]
        return [Anomaly("model_drift", ts_ns=ts, start_pfn=differ[0][0] * self.per_block,
                        end_pfn=differ[-1][1] * self.per_block,
                        message=f"{count} memory block(s) differ between the events and "
                                f"the kernel views for no known reason; the model takes the "
                                f"views", evidence=said)]

    # --- events -------------------------------------------------------------------------------

    def _lost(self, rec):
        self.sure = False
        self.expected = None
        count = rec.get("count", 1)
        if rec["type"] == "skipped":   # a call written begun whose end will not come
            first = rec["seq"]
            self.in_flight = {s: t for s, t in self.in_flight.items()
                              if not first <= s < first + count}
        what = f"{count} event(s) dropped by the BPF buffer" if rec["type"] == "lost" else \
            f"call seq {rec['seq']}" + (f" and the {count - 1} after it" if count > 1 else "") + \
            f" without event ({rec.get('reason', 'lost')})"
        return [Anomaly("events_lost", ts_ns=rec.get("ts_ns") or 0,
                        message=f"{what}: the model resyncs from the next settled snapshot",
                        evidence=[str({k: v for k, v in rec.items() if k != "type"})])]

    def _event(self, e):
        ts = e["ts_ns"]
        if self.in_flight:
            self.in_flight.pop(e["seq"], None)
        self.calls.append((ts, ts + (e.get("duration_ns") or 0)))
        # rules about one call are judged on it alone; `judge`: the rules that also need the
        # model's state (what is present), known only from the first read on, and not after a loss
        judge = self.sure and ts >= self.baseline_end
        fn = e["fn"]
        handler = self._handlers.get(fn)
        if handler is None:
            handler = self._handlers[fn] = getattr(self, "_on_" + fn.lstrip("_"), _no_handler)
        out = handler(e, judge)
        if e["ret"] not in OK_RETS and fn in FAILURES_REPORTED:
            out.append(self._failed(e))
        return out

    def _failed(self, e):
        ret = _errno(e["ret"])
        if e["fn"] == "try_remove_memory" and e["origin"] == "kmem":
            message = (f"dax/kmem could not remove its memory ({ret}): it keeps the range, "
                       f"'System RAM (kmem)' included, pinned until the next reboot, on purpose")
        else:
            message = f"{e['fn']} failed with {ret} ({e['origin']}, {e['comm']})"
        evidence = [_say(e)]
        if e["fn"] == "offline_pages":
            cause, named = _blocked(e.get("blocked_by"))
            if cause:
                message += f": {cause}"
                evidence.append(named)
            elif self.pages_named and e["ret"] == -errno.EBUSY:
                message += (": the kernel named no page (a memory notifier refused, a pageblock "
                            "was isolated already, or a huge page could not migrate)")
        lo_hi = _pfns(e) if e.get("start_pfn") is not None and e.get("nr_pages") else (None, None)
        # a failed online or offline leaves the block as it was: said, not alerted
        severity = INFO if e["fn"] in ("online_pages", "offline_pages", "try_remove_memory") else ""
        conflict = self._device_private_over(*lo_hi) if lo_hi[0] is not None else None
        if conflict and e["fn"] in ("register_memory_resource", "add_memory_resource",
                                    "arch_add_memory"):
            theirs = ", ".join(f"{a:#x}-{b:#x}" for a, b in self.pagemaps[conflict]["ranges"])
            return Anomaly("device_private_conflict", ts_ns=e["ts_ns"], start_pfn=lo_hi[0],
                           end_pfn=lo_hi[1],
                           message=f"{e['fn']} of pfn {lo_hi[0]:#x}-{lo_hi[1]:#x} "
                                   f"({e['origin']}) failed with {ret} against the "
                                   f"device-private pagemap {conflict} over pfn {theirs}",
                           evidence=[_say(e), _say(self.pagemaps[conflict]["event"])])
        return Anomaly("operation_failed", ts_ns=e["ts_ns"], node=e.get("nid"),
                       zone=e.get("zone"), start_pfn=lo_hi[0], end_pfn=lo_hi[1],
                       message=message, evidence=evidence, severity=severity)

    def _device_private_over(self, lo, hi):
        for ptr, pgmap in self.pagemaps.items():
            if pgmap["type"] == "private":   # MEMORY_DEVICE_PRIVATE, as decode names it
                if any(a < hi and lo < b for a, b in pgmap["ranges"]):
                    return ptr
        return None

    def _added(self, e, judge):
        if not _ok(e):
            return []
        lo, hi = _pfns(e)
        self.present.add(lo, hi)
        self.gone.remove(lo, hi)
        known = e.get("zone_device")   # None where mhp_params has no pgmap (before 5.17)
        device = bool(known or e.get("pgmap")) or (known is None and self._in_pagemap_call(e, lo, hi))
        if not device:
            self.removed.remove(lo, hi)
        if self.expected is not None and not device:
            self.expected.fill(*self._blocks_of(lo, hi), ("offline", None))
        out = []
        align = SUBSECTION_BYTES // self.header["page_size"] if device else self.per_block
        if lo % align or hi % align:
            out.append(Anomaly("unaligned_operation", ts_ns=e["ts_ns"], node=e.get("nid"),
                               start_pfn=lo, end_pfn=hi,
                               message=f"{e['fn']} of pfn {lo:#x}-{hi:#x} is not aligned to the "
                                       f"{align} pages a {'ZONE_DEVICE' if device else 'memory-block'}"
                                       f" add needs", evidence=[_say(e)]))
        private = self._device_private_over(lo, hi)
        if judge and private and not device:
            out.append(Anomaly("device_private_conflict", ts_ns=e["ts_ns"], start_pfn=lo,
                               end_pfn=hi,
                               message=f"System RAM pfn {lo:#x}-{hi:#x} was added over the "
                                       f"device-private pagemap {private}",
                               evidence=[_say(e), _say(self.pagemaps[private]["event"])]))
        return out

    def _on_add_pages(self, e, judge):
        return self._added(e, judge) if self.adds_at == "add_pages" else []

    def _on_arch_add_memory(self, e, judge):
        return self._added(e, judge) if self.adds_at == "arch_add_memory" else []

    def _on_remove_pages(self, e, judge):
        """__remove_pages: every removal of sections goes through it (System RAM and ZONE_DEVICE).
        Unbalanced: a part already removed in this trace, or a part no resource ever claimed
        (a pagemap mapped before the trace began is not known, but its owner's range is)."""
        lo, hi = _pfns(e)
        out = []
        missing = [(a, b) for a, b in self.present.gaps(lo, hi)
                   if self.gone.overlap(a, b) or not self.claimed.covers(a, b)]
        if judge and missing:
            twice = any(self.gone.overlap(a, b) for a, b in missing)
            said = ", ".join(f"{a:#x}-{b:#x}" for a, b in missing[:3])
            out.append(Anomaly("unbalanced_remove", ts_ns=e["ts_ns"], start_pfn=lo, end_pfn=hi,
                               message=f"__remove_pages of pfn {lo:#x}-{hi:#x}, where {said} "
                                       f"{'was already removed' if twice else 'was never added'}",
                               evidence=[_say(e)]))
        self.present.remove(lo, hi)
        self.gone.add(lo, hi)
        if not (e.get("pgmap") or self._device_over(lo, hi) or
                ("pgmap" not in e and self._in_pagemap_call(e, lo, hi))):
            # System RAM gone: a resource or a zone edge still on it is judged at the next read
            self.removed.add(lo, hi)
            self.removals[lo] = e
            if self.expected is not None:
                self.expected.clear(*self._blocks_of(lo, hi))
        return out

    def _device_over(self, lo, hi):
        return any(a < hi and lo < b for p in self.pagemaps.values() for a, b in p["ranges"])

    def _in_pagemap_call(self, e, lo, hi):
        """Whether the call `e` ran inside the memremap_pages or memunmap_pages of a pagemap over
        its range. Before 5.17 neither arch_add_memory's mhp_params nor __remove_pages carry the
        pgmap: the call around them is what tells a ZONE_DEVICE add or remove (the trace gives
        the outer call first, numbered at entry, so a call that ended before `e` began is done).
        An outer call still running when a read of the views wanted its place is `begun`, its
        pgmap (read at return) not yet known: then `e` is in it when on the same thread."""
        self._calls_done_before(e)
        return any(a < hi and lo < b for _, ranges in self.pagemap_calls for a, b in ranges) or \
            any(fn in ("memremap_pages", "memunmap_pages") and tid == e.get("tid") and
                ts <= e["ts_ns"] for ts, fn, tid in self.in_flight.values())

    def _pagemap_call(self, e, ranges):
        self._calls_done_before(e)
        self.pagemap_calls.append((e["ts_ns"] + (e.get("duration_ns") or 0), ranges))

    def _calls_done_before(self, e):
        self.pagemap_calls = [c for c in self.pagemap_calls if c[0] >= e["ts_ns"]]

    # online_pages and offline_pages are most of a trace's events: their handlers call little
    def _on_online_pages(self, e, judge):
        if e["ret"] not in OK_RETS:
            return []
        lo, hi = _pfns(e)
        first, end_block = self._blocks_of(lo, hi)
        # before 5.12 online_pages takes no zone (it picks one itself): its event says neither
        # zone nor span, and only the views judge them
        zone = e.get("zone")
        online = self.was_online.get((e.get("nid"), zone))
        if online is None:
            online = self.was_online[(e.get("nid"), zone)] = RangeSet()
        online.add(first, end_block)
        if self.expected is not None:
            self.expected.assign(first, end_block, ("online", zone))
        if zone is None:
            return []
        out = self._present_moved(e, hi - lo)
        start, end = _span(e["span_after"])
        if not (start <= lo and hi <= end):
            out.append(self._span_anomaly(e, lo, hi, f"zone {e['zone']} spans "
                                          f"{start:#x}-{end:#x} after onlining pfn "
                                          f"{lo:#x}-{hi:#x} into it: the span did not grow"))
        return out

    def _on_offline_pages(self, e, judge):
        if e["ret"] not in OK_RETS:
            return []
        lo, hi = _pfns(e)
        if self.expected is not None:
            self.expected.assign(*self._blocks_of(lo, hi), ("offline", None))
        zone = e.get("zone")
        if zone is None:   # offline_pages takes no zone before 5.17 either
            return []
        out = self._present_moved(e, lo - hi)
        if not self.shrinks_at_offline or zone == DEVICE_ZONE:
            return out
        # shrink_zone_span (kernel-reference.md §5.1): offlining at an edge moves that edge past
        # the offlined range; in the middle the span stays
        if e["span_after"]["spanned"] == 0:
            return out
        was, now = _span(e["span_before"]), _span(e["span_after"])
        if was[0] == lo and now[0] < hi:
            out.append(self._span_anomaly(e, now[0], min(hi, now[1]),
                                          f"offlining pfn {lo:#x}-{hi:#x} at the start of zone "
                                          f"{e['zone']} left its start at {now[0]:#x}: the span "
                                          f"did not shrink"))
        elif was[1] == hi and now[1] > lo:
            out.append(self._span_anomaly(e, max(lo, now[0]), now[1],
                                          f"offlining pfn {lo:#x}-{hi:#x} at the end of zone "
                                          f"{e['zone']} left its end at {now[1]:#x}: the span "
                                          f"did not shrink"))
        return out

    def _blocks_of(self, lo, hi):
        """[first, end) of the memory blocks pfn lo..hi touches."""
        return lo // self.per_block, (hi - 1) // self.per_block + 1

    def _span_anomaly(self, e, lo, hi, message):
        return Anomaly("zone_span_leak", ts_ns=e["ts_ns"], node=e.get("nid"), zone=e["zone"],
                       start_pfn=lo, end_pfn=hi, message=message,
                       evidence=[_say(e), f"span before {e['span_before']}, after {e['span_after']}"])

    @staticmethod
    def _present_moved(e, pages):
        moved = e["span_after"]["present"] - e["span_before"]["present"]
        if moved == pages:
            return []
        lo, hi = _pfns(e)
        return [Anomaly("present_pages_mismatch", ts_ns=e["ts_ns"], node=e.get("nid"),
                        zone=e["zone"], start_pfn=lo, end_pfn=hi,
                        message=f"{e['fn']} of {abs(pages)} pages moved zone {e['zone']}'s "
                                f"present pages by {moved:+d}",
                        evidence=[_say(e), f"present {e['span_before']['present']} -> "
                                           f"{e['span_after']['present']}"])]

    def _on_remove_pfn_range_from_zone(self, e, judge):
        if e["zone"] != DEVICE_ZONE or not self.shrinks_at_offline:
            return []
        lo, hi = _pfns(e)
        start, end = _span(e["span_after"])
        if not (start < hi and lo < end) or (lo, hi) in self.stale_said:
            return []
        self.stale_said.add((lo, hi))
        return [Anomaly("device_span_stale", ts_ns=e["ts_ns"], node=e.get("nid"),
                        zone=DEVICE_ZONE, start_pfn=lo, end_pfn=hi,
                        message=f"the Device zone still spans pfn {lo:#x}-{hi:#x} after its "
                                f"pagemap went: ZONE_DEVICE spans never shrink (since 5.5), "
                                f"expected", evidence=[_say(e)])]

    def _on_memremap_pages(self, e, judge):
        return self._mapped(e) if self.maps_at == "memremap_pages" else []

    def _on_devm_memremap_pages(self, e, judge):
        return self._mapped(e) if self.maps_at == "devm_memremap_pages" else []

    def _mapped(self, e):
        pgmap = e.get("pgmap")
        if _ok(e) and pgmap:
            ranges = self._pfn_ranges(pgmap)
            if ranges:
                self.pagemaps[pgmap["ptr"]] = {"type": pgmap["type"], "ranges": ranges,
                                               "event": e, "owner": None}
                self.unmapped.pop(pgmap["ptr"], None)
                self._pagemap_call(e, ranges)
                if pgmap["type"] == "private" and self.physical_end:
                    return self._past_the_end(e, pgmap["ptr"], ranges)
        return []

    def _past_the_end(self, e, ptr, ranges):
        """A device-private pagemap past the end of the physical address space: a
        request_free_mem_region that searched from a top the CPU cannot address put it there,
        or a driver that computed its own range (kernel-reference.md §5.4)."""
        end, bits = self.physical_end
        past = [(lo, hi) for lo, hi in ranges if hi > end]
        if not past:
            return []
        lo, hi = past[0]
        limit = (f"the CPU's {bits['physical']} physical address bits"
                 if bits["physical"] <= bits["max_physmem"] else
                 f"the kernel's MAX_PHYSMEM_BITS, {bits['max_physmem']}")
        return [Anomaly("device_private_conflict", ts_ns=e["ts_ns"], start_pfn=lo, end_pfn=hi,
                        message=f"the device-private pagemap {ptr} over pfn {lo:#x}-{hi:#x} lies "
                                f"past the end of the physical address space, pfn {end:#x} "
                                f"({limit})",
                        evidence=[_say(e), bits["line"]])]

    def _pfn_ranges(self, pgmap):
        page = self.header["page_size"]
        return [pfns_of(a, b, page) for a, b in pgmap["ranges"]]

    def _on_memunmap_pages(self, e, judge):
        pgmap = e.get("pgmap")
        if not pgmap:
            return []
        ptr = pgmap["ptr"]
        self._pagemap_call(e, self._pfn_ranges(pgmap))   # mapped before the trace began, too
        if ptr in self.pagemaps:
            del self.pagemaps[ptr]
            self.unmapped[ptr] = e
            return []
        if judge and ptr in self.unmapped:
            first = self.unmapped[ptr]
            return [Anomaly("unbalanced_remove", ts_ns=e["ts_ns"],
                            message=f"memunmap_pages of pagemap {ptr}, already unmapped by call "
                                    f"seq {first['seq']} and not mapped since",
                            evidence=[_say(first), _say(e)])]
        return []

    def _on_release_mem_region_adjustable(self, e, judge):
        lo, hi = _pfns(e)
        device = next((p for p in self.pagemaps.values()
                       if any(a < hi and lo < b for a, b in p["ranges"])), None)
        if not device:
            return []
        return [Anomaly("device_range_release", ts_ns=e["ts_ns"], start_pfn=lo, end_pfn=hi,
                        message=f"release_mem_region_adjustable of pfn {lo:#x}-{hi:#x}, which a "
                                f"live {device['type']} pagemap holds: a ZONE_DEVICE range "
                                f"released as System RAM",
                        evidence=[_say(e), _say(device["event"])])]


# the outermost call of each path, where a failure is said once
FAILURES_REPORTED = ("online_pages", "offline_pages", "register_memory_resource",
                     "add_memory_resource", "try_remove_memory", "memremap_pages")


def _indexes(snap):
    """The RangeSet of the memory blocks a snapshot has, by index."""
    return RangeSet.of_sorted((r.first, r.last + 1) for r in snap.blocks.runs)


def _states(snap):
    """The BlockMap of a snapshot's memory blocks: index -> (state, zone)."""
    return BlockMap.of_sorted((r.first, r.last + 1, (r.state, r.zone)) for r in snap.blocks.runs)


def _content(rec):
    """What a snapshot record says of the kernel, to compare two reads."""
    return rec.get("zones"), rec.get("memory_blocks"), rec.get("iomem") or rec.get("resources")


def _walk(roots):
    for r in roots:
        yield from r.walk()
