"""Properties of the reference model over random hotplug sequences: a small kernel is simulated
the way kernel-reference.md §2 and §5 say hotplug behaves since 5.5 (blocks added offline under
a "System RAM (...)" resource of their own, onlined into Movable, which grows to cover them,
offlined, which shrinks Movable at its edges to the hull of what stays online, removed with their
resource). Every valid sequence keeps every invariant; the same sequence on a kernel with one
step left out (the shrink at offline, the release at remove) is caught."""

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
    def __init__(self, shrinks=True, releases=True):
        self.shrinks, self.releases = shrinks, releases
        self.state = {i: "online" for i in (*NORMAL, *MOVABLE)}
        self.resources = {}                         # block -> (start, end) of its resource
        self.movable = (MOVABLE.start, MOVABLE.stop)  # span in blocks [lo, hi)

    def step(self, op, i):
        """Do op on block i when it is valid there; True when it was."""
        state = self.state.get(i)
        if op == "add" and state is None:
            self.state[i] = "offline"
            self.resources[i] = (i * BLOCK, (i + 1) * BLOCK - 1)
        elif op == "online" and state == "offline":
            self.state[i] = "online"
            self.movable = (min(self.movable[0], i), max(self.movable[1], i + 1))
        elif op == "offline" and state == "online" and i in HOT:
            self.state[i] = "offline"
            if self.shrinks:
                online = [b for b, s in self.state.items() if s == "online" and b >= MOVABLE.start]
                self.movable = (min(online), max(online) + 1)
        elif op == "remove" and state == "offline" and i in HOT:
            del self.state[i]
            if self.releases:
                del self.resources[i]
        else:
            return False
        return True

    def snapshot(self):
        online_movable = sum(1 for b, s in self.state.items() if s == "online" and b >= 40)
        lo, hi = self.movable
        zones = [Zone(0, "Normal", NORMAL.start * PER_BLOCK, len(NORMAL) * PER_BLOCK,
                      len(NORMAL) * PER_BLOCK, len(NORMAL) * PER_BLOCK),
                 Zone(0, "Movable", lo * PER_BLOCK, (hi - lo) * PER_BLOCK,
                      online_movable * PER_BLOCK, online_movable * PER_BLOCK)]
        blocks = [MemoryBlock(i, s, (("Normal" if i in NORMAL else "Movable"),) if s == "online"
                              else ("Movable",), 0, True) for i, s in sorted(self.state.items())]
        iomem = [Resource(NORMAL.start * BLOCK, MOVABLE.stop * BLOCK - 1, "System RAM", 0, 1)]
        iomem += [Resource(a, b, NAME, 0, 2 + n) for n, (a, b) in enumerate(
            sorted(self.resources.values()))]
        return Snapshot("sim", "sim", PAGE, zones, MemoryBlocks(BLOCK, tuple(blocks)), iomem, None)


def judge(kernel, ops):
    """Feed the model each step's views read twice, 2 s apart (settled, procfs mode)."""
    model = Model()
    found = model.feed({"type": "header", "format": "memhp-trace", "version": 1, "kernel": "sim",
                        "page_size": PAGE, "block_size": BLOCK, "mode": "procfs",
                        "start_time_ns": 0, "start_monotonic_ns": 0})
    t = 10 ** 10
    done = []
    for op, i in [("start", None)] + ops:
        if op == "start" or kernel.step(op, i):
            done.append(op)
            for _ in range(2):
                t += 2 * 10 ** 9
                found += model.feed(formats.snapshot_record(kernel.snapshot(), t, t + 10 ** 6, 0))
    return found + model.finish(), done


sequences = st.lists(st.tuples(st.sampled_from(["add", "online", "offline", "remove"]),
                               st.sampled_from(HOT)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(sequences)
def test_every_valid_sequence_keeps_every_invariant(ops):
    found, _ = judge(Kernel(), ops)
    assert not [a.message for a in found if a.severity == CRITICAL]


@settings(max_examples=300, deadline=None)
@given(sequences)
def test_a_span_that_does_not_shrink_at_offline_is_caught(ops):
    right, wrong = Kernel(), Kernel(shrinks=False)
    differ = False
    for op, i in ops:
        right.step(op, i)
        wrong.step(op, i)
        differ |= right.movable != wrong.movable
    found, _ = judge(Kernel(shrinks=False), ops)
    caught = {a.kind for a in found if a.severity == CRITICAL}
    assert caught == ({"zone_span_leak"} if differ else set())


@settings(max_examples=300, deadline=None)
@given(sequences)
def test_a_remove_that_does_not_release_is_caught(ops):
    found, done = judge(Kernel(releases=False), ops)
    caught = {a.kind for a in found if a.severity == CRITICAL}
    assert caught == ({"resource_leak"} if "remove" in done else set())
