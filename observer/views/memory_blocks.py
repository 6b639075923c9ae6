"""/sys/devices/system/memory (drivers/base/memory.c, kernel-reference.md §4.3).

block_size_bytes is hex without 0x. Per block memoryN/: phys_index (%08lx), state
(online/offline/going-offline), valid_zones (online: its zone, or "none" when the block spans
several zones or nodes; offline: the zones it may go to, default first), removable, and a nodeX
link (also under /sys/devices/system/node/nodeX/memoryN)."""

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .source import ViewError, excerpt, read_view, view_lines, view_path
from .zoneinfo import MAX_NODES, ZONE_NAMES

MEMORY = "/sys/devices/system/memory"
NODES = "/sys/devices/system/node"

# drivers/base/memory.c names each block "memory%u": no sign, no leading zero, ASCII digits. Its
# other entries (block_size_bytes, auto_online_blocks, probe, power, uevent...) never start so.
_BLOCK_DIR = re.compile(r"^memory(0|[1-9][0-9]*)$")
NODE_LINK = re.compile(r"^node(0|[1-9][0-9]*)$")
STATES = ("online", "offline", "going-offline")
# valid_zones: zone names, or "none" (an online block spanning several zones)
VALID_ZONE_WORDS = ZONE_NAMES + ("none",)
# A memory block is at least one section; the smallest SECTION_SIZE_BITS of any architecture is
# powerpc's 24 (16 MiB). x86-64 has 27: 128 MiB blocks or larger.
MIN_BLOCK_SIZE = 1 << 24
ATTR_LIMIT = 1 << 16    # a sysfs attribute is at most one page (64 KiB pages on some arches)

@dataclass(frozen=True)
class MemoryBlock:
    index: int
    state: str
    valid_zones: Tuple[str, ...]
    node: Optional[int]
    removable: Optional[bool]
    # the zone an online block is in; None when offline or when it spans several zones (kept,
    # not computed at each look: the model looks at every block of every read)
    zone: Optional[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        online = self.state == "online" and self.valid_zones and self.valid_zones[0] != "none"
        object.__setattr__(self, "zone", self.valid_zones[0] if online else None)


@dataclass(frozen=True)
class MemoryBlocks:
    block_size: int            # bytes
    blocks: Tuple[MemoryBlock, ...]  # sorted by index
    # what the kernel does with a block it hot-adds (offline, online, online_kernel,
    # online_movable); None where the tree has no auto_online_blocks
    auto_online: Optional[str] = None


def _one_line(root, relpath):
    text = read_view(root, relpath, ATTR_LIMIT)
    lines = view_lines(text)
    if len(lines) != 1 or not lines[0].strip():
        raise ViewError(view_path(root, relpath), f"expected one line, found {excerpt(text)}", 1)
    return lines[0].strip()


def _hex(root, relpath):
    value = _one_line(root, relpath)
    if not re.match(r"^[0-9a-f]+$", value):
        raise ViewError(view_path(root, relpath), f"not a hex number: {excerpt(value)}", 1)
    return int(value, 16)


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError as e:
        raise ViewError(path, e.strerror or str(e)) from None


def _node_number(path, name):
    """The node of a nodeN entry, or None when the name is not one."""
    m = NODE_LINK.match(name)
    if not m:
        return None
    node = int(m.group(1))
    if node >= MAX_NODES:
        raise ViewError(os.path.join(path, name), f"node {node} is beyond any kernel's {MAX_NODES} nodes")
    return node


def _node_of(root, blockdir, index):
    """The node from the block's nodeX link; older captures may have only node*/memoryN."""
    path = view_path(root, blockdir)
    for name in _listdir(path):
        node = _node_number(path, name)
        if node is not None:
            return node
    nodes = view_path(root, NODES)
    if os.path.isdir(nodes):
        for name in _listdir(nodes):
            node = _node_number(nodes, name)
            if node is not None and _exists(os.path.join(nodes, name, f"memory{index}")):
                return node
    return None


def _exists(path):
    """os.path.exists, except that a path it cannot look at is an error, not a no."""
    try:
        os.lstat(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ViewError(path, e.strerror or str(e)) from None


def read_block(root, index):
    d = f"{MEMORY}/memory{index}"
    phys = _hex(root, f"{d}/phys_index")
    if phys != index:
        raise ViewError(view_path(root, f"{d}/phys_index"),
                        f"phys_index {phys:#x} does not match the directory memory{index}", 1)
    state = _one_line(root, f"{d}/state")
    if state not in STATES:
        raise ViewError(view_path(root, f"{d}/state"), f"unknown state {excerpt(state)}", 1)
    zones = tuple(_one_line(root, f"{d}/valid_zones").split())
    unknown = [z for z in zones if z not in VALID_ZONE_WORDS]
    if unknown:
        raise ViewError(view_path(root, f"{d}/valid_zones"), f"unknown zone {excerpt(unknown[0])} "
                        f"(the kernel's words are {', '.join(VALID_ZONE_WORDS)})", 1)
    removable = None
    if _exists(view_path(root, f"{d}/removable")):
        value = _one_line(root, f"{d}/removable")
        if value not in ("0", "1"):
            raise ViewError(view_path(root, f"{d}/removable"), f"expected 0 or 1, found {excerpt(value)}", 1)
        removable = value == "1"
    return MemoryBlock(index, state, zones, _node_of(root, d, index), removable)


def block_indexes(root="/"):
    """The indexes of the memoryN directories. Any other entry named memory... is an error: the
    kernel writes no such name, and skipping it would hide a block or count one twice."""
    path = view_path(root, MEMORY)
    out = []
    for name in _listdir(path):
        if not name.startswith("memory"):
            continue
        m = _BLOCK_DIR.match(name)
        if not m:
            raise ViewError(os.path.join(path, name), "not a memory block name the kernel writes "
                                                      "(memory followed by a decimal number)")
        try:
            mode = os.lstat(os.path.join(path, name)).st_mode
        except FileNotFoundError:
            continue    # hot-removed since the listing
        if not stat.S_ISDIR(mode):
            raise ViewError(os.path.join(path, name), "a memory block that is not a directory")
        out.append(int(m.group(1)))
    return sorted(out)


def read_block_size(root="/"):
    size = _hex(root, f"{MEMORY}/block_size_bytes")
    if size < MIN_BLOCK_SIZE or size & (size - 1):
        raise ViewError(view_path(root, f"{MEMORY}/block_size_bytes"),
                        f"block size {size:#x} is not a power of two of at least "
                        f"{MIN_BLOCK_SIZE >> 20} MiB (one memory section)", 1)
    return size


def read_memory_blocks(root="/", previous=None, changed=()):
    """Every memory block; or, given the MemoryBlocks of an earlier read and the indexes of the
    blocks uevents named since (added, removed, onlined, offlined), those read again and the
    others taken as they were. A block changes state or comes and goes only with a uevent; what
    changes without one, the zones an offline block could go to, no record keeps."""
    if previous is None:
        size = read_block_size(root)
        blocks = _read_blocks(root, block_indexes(root))
        return MemoryBlocks(size, tuple(b for b in blocks.values() if b), read_auto_online(root))
    if not changed:
        return MemoryBlocks(previous.block_size, previous.blocks, read_auto_online(root))
    merged = {b.index: b for b in previous.blocks}
    merged.update(_read_blocks(root, changed))
    return MemoryBlocks(previous.block_size, tuple(merged[i] for i in sorted(merged) if merged[i]),
                        read_auto_online(root))


def _read_blocks(root, indexes):
    """index -> MemoryBlock, or None for a block hot-removed (before or while it was read)."""
    out = {}
    for i in indexes:
        try:
            out[i] = read_block(root, i)
        except ViewError:
            # a block hot-removed is simply gone; anything else is an error
            if os.path.lexists(view_path(root, f"{MEMORY}/memory{i}")):
                raise
            out[i] = None
    return out


def read_auto_online(root="/"):
    """The hot-add policy: one word (drivers/base/memory.c prints online_type_to_str[])."""
    relpath = f"{MEMORY}/auto_online_blocks"
    if not os.path.lexists(view_path(root, relpath)):
        return None
    value = _one_line(root, relpath)
    if not re.match(r"^[a-z_]{1,32}$", value):
        raise ViewError(view_path(root, relpath), f"not a policy word: {excerpt(value)}", 1)
    return value
