"""One read of all kernel views, and the shapes `snapshot` shows: zones, memory blocks grouped
into ranges as lsmem groups them, and the resources hotplug touches."""

import math
import os
from dataclasses import dataclass
from typing import Optional

from .views import iomem, memory_blocks, zoneinfo
from .views.source import ViewError, read_view, view_path

@dataclass
class Snapshot:
    root: str
    kernel: Optional[str]
    page_size: int                  # of the kernel whose views these are (page_size_of)
    zones: list
    blocks: memory_blocks.MemoryBlocks
    resources: Optional[list]      # iomem roots; None when iomem could not be read
    iomem_error: Optional[str]      # why resources is None


def read_kernel_release(root="/"):
    try:
        return read_view(root, "/proc/sys/kernel/osrelease").strip() or None
    except ViewError:
        return None


def take(root="/"):
    """Read every view under root. /proc/iomem alone may be hidden (no CAP_SYS_ADMIN) without
    stopping the rest; any other unreadable view raises ViewError."""
    kernel = read_kernel_release(root)
    zones, blocks = zoneinfo.read_zoneinfo(root), memory_blocks.read_memory_blocks(root)
    try:
        resources, iomem_error = iomem.read_iomem(root), None
    except iomem.IomemHidden as e:
        resources, iomem_error = None, str(e)
    return Snapshot(root, kernel, page_size_of(root, zones, blocks), zones, blocks, resources,
                    iomem_error)


def page_size_of(root, zones, blocks):
    """The page size of the kernel whose views are under root: this machine's when root is /.
    No view states it, so for a captured tree it is read off the views: the bytes of the memory
    blocks not offline over the zones' present pages, rounded to a power of two. On every lab
    and host capture the ratio is the page size exactly; holes inside online blocks would have
    to exceed 29% of them to round it to the next power of two."""
    if root == "/":
        return os.sysconf("SC_PAGE_SIZE")
    online = sum(b.state != "offline" for b in blocks.blocks) * blocks.block_size
    present = sum(z.present for z in zones)
    if not online or not present:
        raise ViewError(view_path(root, zoneinfo.ZONEINFO), "no online memory and no present "
                        "page: the page size of this tree cannot be told")
    return 1 << round(math.log2(online / present))


def block_ranges(blocks):
    """Runs of consecutive blocks with the same state, zone and node, as lsmem prints them."""
    runs = []
    for b in blocks.blocks:
        key = (b.state, b.valid_zones[0] if b.state == "online" and b.valid_zones else None, b.node)
        if runs and runs[-1]["key"] == key and runs[-1]["last"] == b.index - 1:
            runs[-1]["last"] = b.index
        else:
            runs.append({"key": key, "first": b.index, "last": b.index})
    size = blocks.block_size
    return [{"start": r["first"] * size, "end": (r["last"] + 1) * size - 1,
             "size": (r["last"] - r["first"] + 1) * size, "state": r["key"][0],
             "zone": r["key"][1], "node": r["key"][2], "first_block": r["first"],
             "last_block": r["last"]} for r in runs]


def hotplug_resources(roots):
    """The resources hotplug touches, each with its type label and its parent's name."""
    out = []
    for res, parent in iomem.walk(roots):
        kind = iomem.resource_type(res, parent)
        if kind is not None:
            out.append({"start": res.start, "end": res.end, "size": res.size, "name": res.name,
                        "type": kind, "parent": parent.name if parent else None, "line": res.line})
    return out


def to_json(snap):
    """The stable --json shape (README "snapshot --json"); bump `version` on any required change."""
    zones = [{"node": z.node, "zone": z.name, "start_pfn": z.start_pfn, "end_pfn": z.end_pfn,
              "spanned_pages": z.spanned, "present_pages": z.present, "managed_pages": z.managed}
             for z in snap.zones]
    ranges = block_ranges(snap.blocks)
    resources = hotplug_resources(snap.resources) if snap.resources is not None else None
    return {"format": "memhp-snapshot", "version": 1, "root": snap.root, "kernel": snap.kernel,
            "page_size": snap.page_size, "block_size": snap.blocks.block_size, "zones": zones,
            "memory_blocks": ranges, "resources": resources, "iomem_error": snap.iomem_error,
            "summary": summary(snap)}


def summary(snap):
    states = {}
    for b in snap.blocks.blocks:
        states[b.state] = states.get(b.state, 0) + 1
    driver = [r for r, _ in iomem.walk(snap.resources or []) if r.is_driver_managed]
    return {"nodes": len({z.node for z in snap.zones}),
            "zones_populated": sum(1 for z in snap.zones if z.present),
            "blocks": len(snap.blocks.blocks), "blocks_by_state": states,
            "online_bytes": states.get("online", 0) * snap.blocks.block_size,
            "driver_managed_ram_bytes": sum(r.size for r in driver)}
