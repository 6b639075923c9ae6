"""Invariants that the kernel views alone can show (no events): the `check` verb, every
reconcile of the daemon and every lab capture, through judge_views. Pure: a Snapshot in, Anomaly
records out.

The kernel's rules these encode (kernel-reference.md §4, §5):
- A zone's span may cover holes with no memory block (the PCI hole below 4 GiB, a pmem range
  at 4 GiB), zones may overlap (a kmem range onlined Movable inside Normal's boot span), and
  offlining a block in the middle of a zone never shrinks it. Since 5.5 offlining at an edge
  moves the edge to the zone's next online pfn. So a span leak is a span whose edge lies on a
  memory block that exists but is not online in that zone; the leak reaches from that edge to
  the zone's nearest online block.
- Hot-added memory that is present but offline is normal (Debian 6.1 leaves it offline).
- Every memory block is System RAM, so a System RAM resource with no block under it outlived its
  memory (resource_leak) and an online block under no System RAM lost its resource.
- Driver-managed System RAM (kmem, virtio-mem) is added in whole memory blocks."""

from ..views.iomem import IOMEM, walk
from ..views.memory_blocks import MEMORY
from ..views.zoneinfo import ZONEINFO
from .anomaly import Anomaly
from .ranges import RangeSet, pfns_of

DEVICE_ZONE = "Device"  # ZONE_DEVICE spans never shrink since 5.5: not a leak (device_span_stale)


def judge_views(snap, ts_ns, was_online=None):
    """Every view invariant of one snapshot, in the page size of the kernel it was read from.
    Without /proc/iomem (read without CAP_SYS_ADMIN) only the zone rules can be judged.
    was_online(index, zone): whether the block was ever seen online in the zone, where there is
    a history (the model's); a zone edge on a block never online in it is then a hole of the
    boot span that hot-added memory fills, not a span that failed to shrink. The blocks are
    judged run by run (runs of blocks alike), so a judgement costs what the runs are."""
    out = span_leaks(snap.zones, snap.blocks, snap.page_size, ts_ns, was_online)
    if snap.resources is not None:
        out += resource_anomalies(snap.resources, snap.blocks, snap.page_size, ts_ns)
    return [a._replace(standing=True) for a in out]   # states the views show, there until mended


def _zone_evidence(z):
    start = "none shown" if z.start_pfn is None else f"{z.start_pfn:#x}"
    return (f"{ZONEINFO}:{z.line} Node {z.node}, zone {z.name}: start_pfn {start}, "
            f"spanned {z.spanned}, present {z.present}")


def _block_evidence(b):
    return f"{MEMORY}/memory{b.index}: state {b.state}, valid_zones {' '.join(b.valid_zones)}"


def _online_in(run, zone):
    """A run of blocks inside this zone's span that is online in it; or online across several
    zones ("none"), so that its blocks may hold some of the zone's pages (block 0 holds DMA and
    DMA32)."""
    if run.state != "online" or (run.node is not None and run.node != zone.node):
        return False
    return run.spans_zones or run.zone == zone.name


def span_leaks(zones, blocks, page_size, ts_ns, was_online=None):
    per_block = blocks.block_size // page_size
    out = []
    for z in zones:
        if z.name == DEVICE_ZONE or z.spanned == 0:
            continue
        if z.start_pfn is None:
            # present 0: the kernel hides start_pfn, yet the zone still spans pages
            out.append(Anomaly("zone_span_leak", ts_ns=ts_ns, node=z.node, zone=z.name,
                               message=f"zone {z.name} of node {z.node} spans {z.spanned} pages "
                                       f"with no page present in it",
                               evidence=[_zone_evidence(z)]))
            continue
        # the runs of blocks of this zone's node inside its span (a zone may span a hole of
        # many blocks' worth of pfns, or claim to: this costs what is there)
        first, last = z.start_pfn // per_block, (z.end_pfn - 1) // per_block
        mine = [r for r in blocks.runs_between(first, last) if r.node in (None, z.node)]
        inside = [r for r in mine if _online_in(r, z)]

        def stray(index):
            """The block at this index exists, is not online in the zone, and was (or there is
            no history to tell)."""
            run = next((r for r in (mine[0], mine[-1]) if r.first <= index <= r.last),
                       None) if mine else None
            return run is not None and not _online_in(run, z) and \
                (was_online is None or was_online(index, z))

        # Since 5.5 offlining at an edge moves the edge to the zone's next online pfn
        # (shrink_zone_span, kernel-reference.md §5.1): an edge may lie in a hole (a boot span),
        # never on memory that exists but is not online in the zone.
        leaks = []
        if stray(first):
            leaks.append((z.start_pfn, inside[0].first * per_block if inside else z.end_pfn))
        if stray(last) and not (leaks and leaks[0][1] == z.end_pfn):
            leaks.append(((inside[-1].last + 1) * per_block if inside else z.start_pfn, z.end_pfn))
        for lo, hi in leaks:
            strays = [r for r in blocks.runs_between(lo // per_block, (hi - 1) // per_block)
                      if r.node in (None, z.node) and not _online_in(r, z)]
            count = sum(r.last - r.first + 1 for r in strays)
            shown = [blocks.block(i) for r in strays for i in range(r.first, min(r.last + 1,
                                                                                 r.first + 4))][:4]
            out.append(Anomaly(
                "zone_span_leak", ts_ns=ts_ns, node=z.node, zone=z.name, start_pfn=lo, end_pfn=hi,
                message=f"zone {z.name} of node {z.node} spans pfn {lo:#x}-{hi:#x} at its "
                        f"{'start' if lo == z.start_pfn else 'end'}, over {count} memory "
                        f"block(s) not online in it: the span did not shrink",
                evidence=[_zone_evidence(z)] + [_block_evidence(b) for b in shown]))
    return out


def _resource_anomaly(kind, r, page_size, ts_ns, message, evidence):
    """An anomaly about one iomem resource, its line in /proc/iomem first in the evidence."""
    lo, hi = pfns_of(r.start, r.end, page_size)
    return Anomaly(kind, ts_ns=ts_ns, start_pfn=lo, end_pfn=hi, message=message,
                   evidence=[f"{IOMEM}:{r.line} {r.start:x}-{r.end:x} : {r.name}", evidence])


def resource_anomalies(roots, blocks, page_size, ts_ns):
    size = blocks.block_size
    ram = [r for r, _ in walk(roots) if r.is_system_ram]
    out = []
    for r in ram:
        first, last = r.start // size, r.end // size
        if not blocks.runs_between(first, last):
            out.append(_resource_anomaly(
                "resource_leak", r, page_size, ts_ns,
                f"{r.name!r} {r.start:#x}-{r.end:#x} has no memory block under it: "
                f"its memory is gone but the resource was not released",
                f"{MEMORY}: no memory{first}..memory{last}"))
        if r.is_driver_managed and (r.start % size or (r.end + 1) % size):
            out.append(_resource_anomaly(
                "unaligned_operation", r, page_size, ts_ns,
                f"driver-managed {r.name!r} {r.start:#x}-{r.end:#x} is not aligned to "
                f"the {size >> 20} MiB memory block size",
                f"{MEMORY}/block_size_bytes: {size:x}"))
    # online blocks with no System RAM over any part of them (System RAM resources never
    # overlap each other): the blocks some System RAM touches, against the online runs
    covered = RangeSet(((r.start // size, r.end // size + 1) for r in ram))
    for run in blocks.runs:
        if run.state != "online":
            continue
        for a, b in covered.gaps(run.first, run.last + 1):
            for index in range(a, b):
                lo, hi = index * size, (index + 1) * size - 1
                first, end = pfns_of(lo, hi, page_size)
                out.append(Anomaly(
                    "resource_missing", ts_ns=ts_ns, node=run.node, zone=run.zone,
                    start_pfn=first, end_pfn=end,
                    message=f"memory block {index} ({lo:#x}-{hi:#x}) is online but no System RAM "
                            f"resource covers it",
                    evidence=[_block_evidence(blocks.block(index)),
                              f"{IOMEM}: no System RAM over {lo:x}-{hi:x}"]))
    return out

