"""Properties of the reference model over random hotplug sequences: a small kernel is simulated
the way kernel-reference.md §2 and §5 say hotplug behaves since 5.5 (blocks added offline under
a "System RAM (...)" resource of their own, onlined into Movable, which grows to cover them,
offlined, which shrinks Movable at its edges to the hull of what stays online, removed with their
resource). The model sees it as procfs mode does (the views, read twice after each step) and
as BPF mode does (the calls first, then the views). Every valid sequence keeps every invariant;
the same sequence on a kernel with one step left out (the shrink at offline, the release at
remove, the present-page count at online) is caught."""

from hypothesis import given, settings, strategies as st

from observer import formats
from observer.model.anomaly import CRITICAL
from observer.model.model import Model
from observer.snapshot import Snapshot
from observer.views.iomem import Resource
from observer.views.memory_blocks import MemoryBlock, MemoryBlocks
from observer.views.zoneinfo import Zone

PAGE, BLOCK = 4096, 128 << 20
PER_BLOCK = BLOCK // PAGE
NORMAL, MOVABLE = range(32, 40), range(40, 48)     # boot memory: blocks always online
HOT = range(64, 72)                                 # where blocks are hot-added
NAME = "System RAM (sim)"


class Kernel:
    def __init__(self, shrinks=True, releases=True, counts=True):
        self.shrinks, self.releases, self.counts = shrinks, releases, counts
        self.state = {i: "online" for i in (*NORMAL, *MOVABLE)}
        self.resources = {}                         # block -> (start, end) of its resource
        self.movable = (MOVABLE.start, MOVABLE.stop)  # span in blocks [lo, hi)
        self.present = len(MOVABLE) * PER_BLOCK     # Movable's present pages
        self.events = []                            # what the probes would have seen
        self.t = 10 ** 10

    def span(self):
        lo, hi = self.movable
        return {"start_pfn": lo * PER_BLOCK, "spanned": (hi - lo) * PER_BLOCK,
                "present": self.present}

    def call(self, fn, i, **more):
        self.t += 10 ** 6
        self.events.append(dict({"type": "event", "seq": len(self.events), "ts_ns": self.t,
                                 "fn": fn, "duration_ns": 1000, "ret": 0 if fn.endswith(
                                     "_pages") and fn != "__remove_pages" else None,
                                 "pid": 1, "tid": 1, "comm": "sim", "caller": "sim",
                                 "origin": "sysfs", "start_pfn": i * PER_BLOCK,
                                 "nr_pages": PER_BLOCK, "nid": 0}, **more))

    def step(self, op, i):
        """Do op on block i when it is valid there; True when it was."""
        state = self.state.get(i)
        before = self.span()
        if op == "add" and state is None:
            self.state[i] = "offline"
            self.resources[i] = (i * BLOCK, (i + 1) * BLOCK - 1)
            self.call("add_pages", i, zone_device=False)
        elif op == "online" and state == "offline":
            self.state[i] = "online"
            self.movable = (min(self.movable[0], i), max(self.movable[1], i + 1))
            self.present += PER_BLOCK if self.counts else 0
            self.call("online_pages", i, zone="Movable", span_before=before, span_after=self.span())
        elif op == "offline" and state == "online" and i in HOT:
            self.state[i] = "offline"
            if self.shrinks:
                online = [b for b, s in self.state.items() if s == "online" and b >= MOVABLE.start]
                self.movable = (min(online), max(online) + 1)
            self.present -= PER_BLOCK
            self.call("offline_pages", i, zone="Movable", span_before=before, span_after=self.span())
        elif op == "remove" and state == "offline" and i in HOT:
            del self.state[i]
            self.call("__remove_pages", i)
            if self.releases:
                del self.resources[i]
                self.call("release_mem_region_adjustable", i)
        else:
            return False
        return True

    def snapshot(self):
        lo, hi = self.movable
        zones = [Zone(0, "Normal", NORMAL.start * PER_BLOCK, len(NORMAL) * PER_BLOCK,
                      len(NORMAL) * PER_BLOCK, len(NORMAL) * PER_BLOCK),
                 Zone(0, "Movable", lo * PER_BLOCK, (hi - lo) * PER_BLOCK,
                      self.present, self.present)]
        blocks = [MemoryBlock(i, s, (("Normal" if i in NORMAL else "Movable"),) if s == "online"
                              else ("Movable",), 0, True) for i, s in sorted(self.state.items())]
        iomem = [Resource(NORMAL.start * BLOCK, MOVABLE.stop * BLOCK - 1, "System RAM", 0, 1)]
        iomem += [Resource(a, b, NAME, 0, 2 + n) for n, (a, b) in enumerate(
            sorted(self.resources.values()))]
        return Snapshot("sim", "sim", PAGE, zones, MemoryBlocks(BLOCK, tuple(blocks)), iomem, None)


PROBED = ("add_pages", "online_pages", "offline_pages", "__remove_pages",
          "release_mem_region_adjustable", "remove_pfn_range_from_zone")


def judge(kernel, ops, mode="procfs"):
    """Feed the model each step's views read twice, 2 s apart (settled), after the step's
    calls in BPF mode."""
    model = Model()
    found = model.feed({"type": "header", "format": "memhp-trace", "version": 1, "kernel": "sim",
                        "page_size": PAGE, "block_size": BLOCK, "mode": mode,
                        "start_time_ns": 0, "start_monotonic_ns": 0,
                        "probes": {fn: {"attached": mode == "bpf"} for fn in PROBED}})
    done, fed = [], 0
    for op, i in [("start", None)] + ops:
        if op == "start" or kernel.step(op, i):
            done.append(op)
            if mode == "bpf":
                for e in kernel.events[fed:]:
                    found += model.feed(e)
                fed = len(kernel.events)
            for _ in range(2):
                kernel.t += 2 * 10 ** 9
                found += model.feed(formats.snapshot_record(kernel.snapshot(), kernel.t,
                                                            kernel.t + 10 ** 6, fed))
    return found + model.finish(), done


sequences = st.lists(st.tuples(st.sampled_from(["add", "online", "offline", "remove"]),
                               st.sampled_from(HOT)), max_size=30)


modes = st.sampled_from(["procfs", "bpf"])


@settings(max_examples=300, deadline=None)
@given(sequences, modes)
def test_every_valid_sequence_keeps_every_invariant(ops, mode):
    found, _ = judge(Kernel(), ops, mode)
    assert not [a.message for a in found if a.severity == CRITICAL or a.kind == "model_drift"]


@settings(max_examples=300, deadline=None)
@given(sequences, modes)
def test_a_span_that_does_not_shrink_at_offline_is_caught(ops, mode):
    right, wrong = Kernel(), Kernel(shrinks=False)
    differ = False
    for op, i in ops:
        right.step(op, i)
        wrong.step(op, i)
        differ |= right.movable != wrong.movable
    found, _ = judge(Kernel(shrinks=False), ops, mode)
    caught = {a.kind for a in found if a.severity == CRITICAL}
    assert caught == ({"zone_span_leak"} if differ else set())


@settings(max_examples=300, deadline=None)
@given(sequences, modes)
def test_a_remove_that_does_not_release_is_caught(ops, mode):
    found, done = judge(Kernel(releases=False), ops, mode)
    caught = {a.kind for a in found if a.severity == CRITICAL}
    assert caught == ({"resource_leak"} if "remove" in done else set())


@settings(max_examples=300, deadline=None)
@given(sequences)
def test_an_online_that_does_not_count_its_pages_is_caught_on_the_call(ops):
    found, done = judge(Kernel(counts=False), ops, "bpf")
    mismatched = [a for a in found if a.kind == "present_pages_mismatch"]
    assert len(mismatched) == done.count("online")
    assert all(a.severity == CRITICAL and "+0" in a.message for a in mismatched)
