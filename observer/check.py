"""Invariants that the kernel views alone can show (no events): the `check` verb and every
reconcile of the daemon. Pure: a Snapshot in, Anomaly records out.

The kernel's rules these encode (kernel-reference.md §4, §5):
- A zone's span may cover holes with no memory block (the PCI hole below 4 GiB), and offlining a
  block in the middle of a zone never shrinks it; since 5.5 offlining shrinks the span at its
  edges. So a span leak is a part of the span beyond the hull of the blocks online in that zone
  that reaches memory blocks which exist but are not online there.
- Hot-added memory that is present but offline is normal (Debian 6.1 leaves it offline).
- Every memory block is System RAM, so a System RAM resource with no block under it outlived its
  memory (resource_leak) and an online block under no System RAM lost its resource.
- Driver-managed System RAM (kmem, virtio-mem) is added in whole memory blocks."""

from .model.anomaly import Anomaly
from .views.iomem import IOMEM, walk
from .views.memory_blocks import MEMORY
from .views.zoneinfo import ZONEINFO

DEVICE_ZONE = "Device"  # ZONE_DEVICE spans never shrink since 5.5: not a leak (device_span_stale)


def check(snap, page_size, ts_ns):
    """All view invariants of one snapshot. /proc/iomem must have been readable."""
    if snap.resources is None:
        raise ValueError(f"resource invariants need /proc/iomem: {snap.iomem_error}")
    return (span_leaks(snap.zones, snap.blocks, page_size, ts_ns)
            + resource_anomalies(snap.resources, snap.blocks, page_size, ts_ns))


def _zone_evidence(z):
    start = "none shown" if z.start_pfn is None else f"{z.start_pfn:#x}"
    return (f"{ZONEINFO}:{z.line} Node {z.node}, zone {z.name}: start_pfn {start}, "
            f"spanned {z.spanned}, present {z.present}")


def _block_evidence(b):
    return f"{MEMORY}/memory{b.index}: state {b.state}, valid_zones {' '.join(b.valid_zones)}"


def _online_in(block, zone, per_block):
    """Online in this zone; or online across several zones ("none") and inside this zone's span,
    so that it may hold some of its pages (block 0 holds DMA and DMA32)."""
    if block.state != "online" or (block.node is not None and block.node != zone.node):
        return False
    if block.valid_zones[:1] == ("none",):
        return block.index * per_block < zone.end_pfn and (block.index + 1) * per_block > zone.start_pfn
    return block.zone == zone.name


def span_leaks(zones, blocks, page_size, ts_ns):
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
        mine = [b for b in blocks.blocks if _online_in(b, z, per_block)]
        hull = (mine[0].index * per_block, (mine[-1].index + 1) * per_block) if mine else None
        excess = [(z.start_pfn, z.end_pfn)] if hull is None else \
            [(z.start_pfn, min(z.end_pfn, hull[0])), (max(z.start_pfn, hull[1]), z.end_pfn)]
        for lo, hi in excess:
            if lo >= hi:
                continue
            stray = [b for b in blocks.blocks
                     if b.index * per_block < hi and (b.index + 1) * per_block > lo
                     and b.node in (None, z.node) and not _online_in(b, z, per_block)]
            if stray:
                lo = max(lo, stray[0].index * per_block)
                hi = min(hi, (stray[-1].index + 1) * per_block)
                out.append(Anomaly(
                    "zone_span_leak", ts_ns=ts_ns, node=z.node, zone=z.name, start_pfn=lo,
                    end_pfn=hi,
                    message=f"zone {z.name} of node {z.node} spans pfn {lo:#x}-{hi:#x}, beyond "
                            f"its online memory, over {len(stray)} memory block(s) not online in it",
                    evidence=[_zone_evidence(z)] + [_block_evidence(b) for b in stray[:4]]))
    return out


def resource_anomalies(roots, blocks, page_size, ts_ns):
    size = blocks.block_size
    present = {b.index: b for b in blocks.blocks}
    ram = [r for r, _ in walk(roots) if r.is_system_ram]
    out = []
    for r in ram:
        first, last = r.start // size, r.end // size
        if not any(i in present for i in range(first, last + 1)):
            out.append(Anomaly(
                "resource_leak", ts_ns=ts_ns, start_pfn=r.start // page_size,
                end_pfn=(r.end + 1) // page_size,
                message=f"{r.name!r} {r.start:#x}-{r.end:#x} has no memory block under it: "
                        f"its memory is gone but the resource was not released",
                evidence=[f"{IOMEM}:{r.line} {r.start:x}-{r.end:x} : {r.name}",
                          f"{MEMORY}: no memory{first}..memory{last}"]))
        if r.is_driver_managed and (r.start % size or (r.end + 1) % size):
            out.append(Anomaly(
                "unaligned_operation", ts_ns=ts_ns, start_pfn=r.start // page_size,
                end_pfn=(r.end + 1) // page_size,
                message=f"driver-managed {r.name!r} {r.start:#x}-{r.end:#x} is not aligned to "
                        f"the {size >> 20} MiB memory block size",
                evidence=[f"{IOMEM}:{r.line} {r.start:x}-{r.end:x} : {r.name}",
                          f"{MEMORY}/block_size_bytes: {size:x}"]))
    # online blocks with no System RAM over any part of them: one sweep over both sorted lists
    # (System RAM resources never overlap each other)
    ram.sort(key=lambda r: r.start)
    j = 0
    for b in blocks.blocks:
        lo, hi = b.index * size, (b.index + 1) * size - 1
        while j < len(ram) and ram[j].end < lo:
            j += 1
        covered = j < len(ram) and ram[j].start <= hi
        if b.state == "online" and not covered:
            out.append(Anomaly(
                "resource_missing", ts_ns=ts_ns, node=b.node, zone=b.zone,
                start_pfn=lo // page_size, end_pfn=(hi + 1) // page_size,
                message=f"memory block {b.index} ({lo:#x}-{hi:#x}) is online but no System RAM "
                        f"resource covers it",
                evidence=[_block_evidence(b), f"{IOMEM}: no System RAM over {lo:x}-{hi:x}"]))
    return out
