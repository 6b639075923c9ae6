"""/sys/devices/system/memory (drivers/base/memory.c, kernel-reference.md §4.3).

block_size_bytes is hex without 0x. Per block memoryN/: phys_index (%08lx), state
(online/offline/going-offline), valid_zones (online: its zone, or "none" when the block spans
several zones or nodes; offline: the zones it may go to, default first), removable, and a nodeX
link (also under /sys/devices/system/node/nodeX/memoryN)."""

import os
import re
from dataclasses import dataclass
from typing import Optional, Tuple

from .source import ViewError, read_view, view_path

MEMORY = "/sys/devices/system/memory"
NODES = "/sys/devices/system/node"

_BLOCK_DIR = re.compile(r"^memory(\d+)$")
_NODE_LINK = re.compile(r"^node(\d+)$")
STATES = ("online", "offline", "going-offline")


@dataclass(frozen=True)
class MemoryBlock:
    index: int
    state: str
    valid_zones: Tuple[str, ...]
    node: Optional[int]
    removable: Optional[bool]

    @property
    def zone(self):
        """The zone an online block is in; None when offline or when it spans several zones."""
        if self.state == "online" and self.valid_zones and self.valid_zones[0] != "none":
            return self.valid_zones[0]
        return None


@dataclass(frozen=True)
class MemoryBlocks:
    block_size: int            # bytes
    blocks: Tuple[MemoryBlock, ...]  # sorted by index


def _one_line(root, relpath):
    text = read_view(root, relpath)
    lines = text.splitlines()
    if len(lines) != 1 or not lines[0].strip():
        raise ViewError(view_path(root, relpath), f"expected one line, found {text!r}", 1)
    return lines[0].strip()


def _hex(root, relpath):
    value = _one_line(root, relpath)
    try:
        return int(value, 16)
    except ValueError:
        raise ViewError(view_path(root, relpath), f"not a hex number: {value!r}", 1) from None


def _node_of(root, blockdir, index):
    """The node from the block's nodeX link; older captures may have only node*/memoryN."""
    path = view_path(root, blockdir)
    try:
        names = os.listdir(path)
    except OSError as e:
        raise ViewError(path, e.strerror or str(e)) from None
    for name in names:
        m = _NODE_LINK.match(name)
        if m:
            return int(m.group(1))
    nodes = view_path(root, NODES)
    if os.path.isdir(nodes):
        for name in os.listdir(nodes):
            m = _NODE_LINK.match(name)
            if m and os.path.exists(os.path.join(nodes, name, f"memory{index}")):
                return int(m.group(1))
    return None


def read_block(root, index):
    d = f"{MEMORY}/memory{index}"
    phys = _hex(root, f"{d}/phys_index")
    if phys != index:
        raise ViewError(view_path(root, f"{d}/phys_index"),
                        f"phys_index {phys:#x} does not match the directory memory{index}", 1)
    state = _one_line(root, f"{d}/state")
    if state not in STATES:
        raise ViewError(view_path(root, f"{d}/state"), f"unknown state {state!r}", 1)
    zones = tuple(_one_line(root, f"{d}/valid_zones").split())
    removable = None
    if os.path.exists(view_path(root, f"{d}/removable")):
        value = _one_line(root, f"{d}/removable")
        if value not in ("0", "1"):
            raise ViewError(view_path(root, f"{d}/removable"), f"expected 0 or 1, found {value!r}", 1)
        removable = value == "1"
    return MemoryBlock(index, state, zones, _node_of(root, d, index), removable)


def block_indexes(root="/"):
    path = view_path(root, MEMORY)
    try:
        names = os.listdir(path)
    except OSError as e:
        raise ViewError(path, e.strerror or str(e)) from None
    return sorted(int(m.group(1)) for m in map(_BLOCK_DIR.match, names) if m)


def read_block_size(root="/"):
    size = _hex(root, f"{MEMORY}/block_size_bytes")
    if size <= 0 or size & (size - 1):
        raise ViewError(view_path(root, f"{MEMORY}/block_size_bytes"),
                        f"block size {size:#x} is not a power of two", 1)
    return size


def read_memory_blocks(root="/"):
    size = read_block_size(root)
    blocks = []
    for i in block_indexes(root):
        try:
            blocks.append(read_block(root, i))
        except ViewError:
            # a block hot-removed while we read it is simply gone; anything else is an error
            if os.path.isdir(view_path(root, f"{MEMORY}/memory{i}")):
                raise
    return MemoryBlocks(size, tuple(blocks))
