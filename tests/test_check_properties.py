"""Properties of the span rule over many block layouts derived from the host capture: offlining
blocks inside a zone never leaks; offlining from a zone's edge without shrinking its span leaks
exactly the offlined run."""

from hypothesis import given, settings, strategies as st

from conftest import HOST
from observer import snapshot
from observer.model.invariants import span_leaks
from observer.views.memory_blocks import MemoryBlocks

SNAP = snapshot.take(HOST)
PAGE = SNAP.page_size
PER_BLOCK = SNAP.blocks.block_size // PAGE
NORMAL = [b.index for b in SNAP.blocks.blocks if b.zone == "Normal"]


def offlined(indexes):
    blocks = tuple(b._replace(state="offline", valid_zones=("Normal", "Movable"))
                   if b.index in indexes else b for b in SNAP.blocks.blocks)
    return MemoryBlocks(SNAP.blocks.block_size, blocks, SNAP.blocks.auto_online)


@settings(max_examples=60, deadline=None)
@given(st.sets(st.sampled_from(NORMAL[1:-1]), max_size=40))
def test_offlining_inside_normal_never_leaks(inner):
    assert span_leaks(SNAP.zones, offlined(inner), PAGE, 0) == []


@settings(max_examples=60, deadline=None)
@given(st.integers(1, len(NORMAL) - 1), st.booleans())
def test_offlining_from_an_edge_leaks_exactly_that_run(n, top):
    run = NORMAL[-n:] if top else NORMAL[:n]
    [leak] = span_leaks(SNAP.zones, offlined(set(run)), PAGE, 0)
    assert (leak.zone, leak.start_pfn, leak.end_pfn) == \
        ("Normal", run[0] * PER_BLOCK, (run[-1] + 1) * PER_BLOCK)
