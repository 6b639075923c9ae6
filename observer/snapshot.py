"""One read of all kernel views into a typed Snapshot (its JSON shapes are in formats.py)."""

from __future__ import annotations

import math
import os
from collections import namedtuple

from .views import iomem, memory_blocks, zoneinfo
from .views.source import ViewError, read_view, view_path

Snapshot = namedtuple("Snapshot", [
    "root", "kernel",
    "page_size",     # of the kernel whose views these are (page_size_of)
    "zones",         # [zoneinfo.Zone]
    "blocks",        # memory_blocks.MemoryBlocks
    "resources",     # iomem roots; None when iomem could not be read
    "iomem_error",   # why resources is None
])


def read_kernel_release(root="/"):
    try:
        return read_view(root, "/proc/sys/kernel/osrelease").strip() or None
    except ViewError:
        return None


def take(root="/", blocks_before=None, changed=None):
    """Read every view under root. /proc/iomem alone may be hidden (no CAP_SYS_ADMIN) without
    stopping the rest; any other unreadable view raises ViewError. blocks_before: the memory
    blocks of an earlier read, of which only those uevents named since are read again
    (`changed`: block index -> the uevent's action)."""
    kernel = read_kernel_release(root)
    zones = zoneinfo.read_zoneinfo(root)
    blocks = memory_blocks.read_memory_blocks(root, blocks_before, changed)
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
    online = sum(r.last - r.first + 1 for r in blocks.runs if r.state != "offline") * \
        blocks.block_size
    present = sum(z.present for z in zones)
    if not online or not present:
        raise ViewError(view_path(root, zoneinfo.ZONEINFO), "no online memory and no present "
                        "page: the page size of this tree cannot be told")
    return 1 << round(math.log2(online / present))
