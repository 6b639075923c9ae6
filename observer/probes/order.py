"""Call order. Every probed call takes a number from one global counter at entry (in BPF), and
its event is emitted at return. Events arrive in return order (nested calls return first) and,
from per-CPU perf buffers, in any order; releasing them by that number restores the order in
which the kernel made the calls. Pure: events in, records out.

A call can run for long (memunmap_pages waiting for page references, offline_pages migrating, a
large DIMM onlined): everything after it would wait for its return. So when the next number has
not come for `wait_seconds`, the caller is asked what became of the numbers missing
(`in_flight()`: the entry halves of the calls still running, one read of the BPF map of calls
in flight), and the trace says so at that place: a `begun` record for a call in flight, whose
event then comes later with the same seq, or one `skipped` record for each run of consecutive
numbers with neither event nor call (lost events: its `count` says how many). Order is kept,
nothing waits long, nothing is dropped silently, and a storm that loses many events costs one
record per run, not one per number. A call written `begun` whose entry has since left the map
of calls in flight without an event (its return probe did not run: see threads.py) is written
`skipped` too, once two looks a second apart found it gone, so the trace does not say it runs
for ever."""

LOST = "no event and no call in flight (lost)"
MISSED = "begun, then gone from the calls in flight without an event (its return was not seen)"


class CallOrder:
    def __init__(self, wait_seconds=1.0, in_flight=dict):
        self.next_seq = 0           # the counter starts at 0 when the program loads
        self.pending = {}           # seq -> (event, arrival time)
        self.wait_seconds = wait_seconds
        self.in_flight = in_flight  # () -> {seq: the entry half of a running call (a dict)}
        self.begun = set()          # seqs written as `begun`, whose events are still to come
        self.skipped = 0            # numbers written as `skipped`
        self.gone = set()           # begun seqs the last look at the calls in flight did not find
        self.next_look = 0          # when to look for them again

    def feed(self, event, now):
        """Add one event (or a `left_out` record: a call the trace leaves out, which only frees
        its number); return the records now in order."""
        seq = event["seq"]
        if seq < self.next_seq:     # its `begun` (or `skipped`) record holds its place already
            self.begun.discard(seq)
            return [event] if event["type"] == "event" else []
        self.pending[seq] = (event, now)
        return self._release()

    def holding(self):
        """Events held for a number still to come, or calls written `begun` still to end: their
        records come by time (expire), so the caller looks again soon."""
        return bool(self.pending or self.begun)

    def _release(self):
        out = []
        while self.next_seq in self.pending:
            event = self.pending.pop(self.next_seq)[0]
            if event["type"] == "event":
                out.append(event)
            self.next_seq += 1
        return out

    def expire(self, now):
        """Records for the numbers the waiting events have waited for too long."""
        out = []
        running = None
        while self.pending and min(t for _, t in self.pending.values()) < now - self.wait_seconds:
            if running is None:
                running = self.in_flight()
            first, end = self.next_seq, min(self.pending)
            for seq in sorted(s for s in running if first <= s < end) + [end]:
                if seq > first:
                    out.append({"type": "skipped", "seq": first, "count": seq - first,
                                "reason": LOST})
                    self.skipped += seq - first
                if seq < end:
                    out.append(dict(running[seq], type="begun"))
                    self.begun.add(seq)
                first = seq + 1
            self.next_seq = end
            out += self._release()
        return out + self._missed(now, running)

    def _missed(self, now, running):
        """`skipped` records for begun calls gone from the calls in flight at two looks, a
        wait apart (at the first, the event may still be in the buffer, unread). running: the
        calls in flight if expire has just read them, else None."""
        if not self.begun or now < self.next_look:
            return []
        self.next_look = now + self.wait_seconds
        gone = self.begun - set(self.in_flight() if running is None else running)
        missed, self.gone = sorted(gone & self.gone), gone - self.gone
        self.begun -= set(missed)
        self.skipped += len(missed)
        return [{"type": "skipped", "seq": s, "count": 1, "reason": MISSED} for s in missed]

    def release_to(self, upto):
        """Without waiting: records up to number `upto` where every number below it is either
        held here or a call still running (written `begun`); stops at a number that is neither
        (its event may still be on its way, or lost: expire decides)."""
        out = []
        running = None
        while self.next_seq < upto:
            if self.next_seq not in self.pending:
                if running is None:
                    running = self.in_flight()
                call = running.get(self.next_seq)
                if call is None:
                    break
                out.append(dict(call, type="begun"))
                self.begun.add(self.next_seq)
                self.next_seq += 1
            out += self._release()
        return out

    def drain(self):
        """Everything still held, in order (at the end of a recording)."""
        out = [self.pending[s][0] for s in sorted(self.pending)
               if self.pending[s][0]["type"] == "event"]
        self.pending.clear()
        return out
