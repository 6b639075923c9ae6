"""Call order. Every probed call takes a number from one global counter at entry (in BPF), and
its event is emitted at return. Events arrive in return order (nested calls return first) and,
from per-CPU perf buffers, in any order; releasing them by that number restores the order in
which the kernel made the calls. Pure: events in, events out."""


class CallOrder:
    def __init__(self, stall_seconds=10.0):
        self.next_seq = 0           # the counter starts at 0 when the program loads
        self.pending = {}           # seq -> (event, arrival time)
        self.stall_seconds = stall_seconds
        self.skipped = 0            # numbers given up on (a lost event, a call that never returned)

    def feed(self, event, now):
        """Add one event; return the events that are now in order."""
        seq = event["seq"]
        if seq < self.next_seq:     # released past it already (after a stall): late, let it out
            return [event]
        self.pending[seq] = (event, now)
        return self._release()

    def _release(self):
        out = []
        while self.next_seq in self.pending:
            out.append(self.pending.pop(self.next_seq)[0])
            self.next_seq += 1
        return out

    def expire(self, now):
        """A number whose event has not come while later ones waited stall_seconds is skipped:
        its call is still running, or its event was lost (which the lost counter reports)."""
        out = []
        while self.pending and min(t for _, t in self.pending.values()) < now - self.stall_seconds:
            first = min(self.pending)
            self.skipped += first - self.next_seq
            self.next_seq = first
            out += self._release()
        return out

    def drain(self):
        """Everything still held, in order (at the end of a recording)."""
        out = [self.pending[s][0] for s in sorted(self.pending)]
        self.pending.clear()
        return out
