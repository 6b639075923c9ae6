"""/sys/devices/system/memory (drivers/base/memory.c, kernel-reference.md §4.3).

block_size_bytes is hex without 0x. Per block memoryN/: phys_index (%08lx), state
(online/offline/going-offline), valid_zones (online: its zone, or "none" when the block spans
several zones or nodes; offline: the zones it may go to, default first), removable, and a nodeX
link (also under /sys/devices/system/node/nodeX/memoryN)."""

from __future__ import annotations

import os
import re
import stat
from bisect import bisect_left, bisect_right
from collections import namedtuple

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

class MemoryBlock(namedtuple("MemoryBlock", "index state valid_zones node removable")):
    __slots__ = ()

    @property
    def zone(self):
        """The zone an online block is in; None when offline or when it spans several zones."""
        online = self.state == "online" and self.valid_zones and self.valid_zones[0] != "none"
        return self.valid_zones[0] if online else None


def _run_of(block):
    return BlockRun.alike(block.index, block.index, block.state,
                          block.valid_zones[0] if block.valid_zones else None, block.node)


def _merged(runs):
    """Runs in order, those that touch and are alike made one."""
    out = []
    for r in runs:
        if out and out[-1].last == r.first - 1 and \
                (out[-1].state, out[-1].zone, out[-1].node, out[-1].spans_zones) == \
                (r.state, r.zone, r.node, r.spans_zones):
            out[-1] = out[-1]._replace(last=r.last)
        else:
            out.append(r)
    return tuple(out)


class BlockRun(namedtuple("BlockRun", [
        "first", "last", "state",
        "zone",          # an online run's zone; None offline or where it spans several
        "node",
        "spans_zones",   # online across several zones: valid_zones says "none"
], defaults=(False,))):
    """Consecutive memory blocks alike: state, node and, online, the zone (as lsmem groups them)."""
    __slots__ = ()

    @classmethod
    def alike(cls, first, last, state, word, node):
        """The run of blocks in this state whose valid_zones begins with `word` (an online
        block's zone, or "none")."""
        online = state == "online" and bool(word)
        return cls(first, last, state, word if online and word != "none" else None, node,
                   online and word == "none")

    @property
    def zone_word(self):
        """The zone as valid_zones begins for an online block, as a snapshot record keeps it."""
        return "none" if self.spans_zones else self.zone

    def block(self, index):
        """One of its blocks, as a snapshot record gives it back."""
        return MemoryBlock(index, self.state, (self.zone_word,) if self.zone_word else (),
                           self.node, None)


class MemoryBlocks:
    """The memory blocks of one read, sorted by index: read block by block (`blocks`), or as
    runs of blocks alike (`runs`, what a snapshot record keeps); each is made from the other
    when first asked for, so that a read kept as runs is judged run by run."""

    def __init__(self, block_size, blocks=None, auto_online=None, runs=None):
        self.block_size = block_size    # bytes
        # what the kernel does with a block it hot-adds (offline, online, online_kernel,
        # online_movable); None where the tree has no auto_online_blocks
        self.auto_online = auto_online
        self._blocks = None if blocks is None else tuple(blocks)
        self._runs = None if runs is None else tuple(runs)

    @property
    def blocks(self):
        if self._blocks is None:
            self._blocks = tuple(r.block(i) for r in self._runs for i in range(r.first, r.last + 1))
        return self._blocks

    @property
    def runs(self):
        if self._runs is None:
            self._runs = _merged(_run_of(b) for b in self._blocks)
        return self._runs

    def with_blocks(self, changed, auto_online):
        """These blocks with some read again: index -> MemoryBlock, or None where it is gone.
        Costs what changed, times the runs: the runs are cut around them and those read again
        put in. The result is kept as runs (all a snapshot record keeps): a copy of every block
        would visit each of them, milliseconds on 10^5 blocks."""
        runs = list(self.runs)
        for index in sorted(changed):
            k = bisect_right(runs, index, key=lambda r: r.first) - 1
            if k >= 0 and runs[k].last >= index:   # cut its run around it
                r = runs[k]
                runs[k:k + 1] = [r._replace(last=index - 1)] * (r.first < index) + \
                    [r._replace(first=index + 1)] * (index < r.last)
            if changed[index] is not None:
                k = bisect_right(runs, index, key=lambda r: r.first)
                runs.insert(k, _run_of(changed[index]))
        return MemoryBlocks(self.block_size, auto_online=auto_online, runs=_merged(runs))

    def count(self):
        return sum(r.last - r.first + 1 for r in self.runs)

    def block(self, index):
        """The block of this index, or None."""
        if self._blocks is not None:
            i = bisect_left(self._blocks, index, key=lambda b: b.index)
            return self._blocks[i] if i < len(self._blocks) and self._blocks[i].index == index \
                else None
        r = self.run_at(index)
        return r and r.block(index)

    def run_at(self, index):
        """The run holding this index, or None."""
        runs = self.runs
        i = bisect_right(runs, index, key=lambda r: r.first) - 1
        return runs[i] if i >= 0 and runs[i].last >= index else None

    def runs_between(self, first, last):
        """The runs holding blocks first..last, cut to them."""
        runs = self.runs
        i = max(0, bisect_right(runs, first, key=lambda r: r.first) - 1)
        out = []
        for r in runs[i:]:
            if r.first > last:
                break
            if r.last >= first:
                out.append(r if first <= r.first and r.last <= last else
                           r._replace(first=max(r.first, first), last=min(r.last, last)))
        return out

    def __eq__(self, other):
        """The same blocks in the same states, zones and nodes (what the runs keep)."""
        return isinstance(other, MemoryBlocks) and \
            (self.block_size, self.auto_online, self.runs) == \
            (other.block_size, other.auto_online, other.runs)

    def __repr__(self):
        return f"MemoryBlocks({self.block_size}, {len(self.runs)} runs, {self.auto_online!r})"


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
    node = _node_of(root, d, index)
    # 5.10 works out an offline block's valid_zones from its node, which a block being added
    # (its uevent already sent) has only once linked to it: read before, the kernel looked up
    # NODE_DATA(NUMA_NO_NODE) and oopsed (a lab guest, virtio-mem growing). Not asked till then.
    zones = () if state != "online" and node is None else \
        tuple(_one_line(root, f"{d}/valid_zones").split())
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
    return MemoryBlock(index, state, zones, node, removable)


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


def read_memory_blocks(root="/", previous=None, changed=None):
    """Every memory block; or, given the MemoryBlocks of an earlier read and the blocks uevents
    named since (index -> the last action: add, remove, online, offline), those read again and
    the others taken as they were. A block changes state or comes and goes only with a uevent;
    what changes without one, the zones an offline block could go to, no record keeps. A block
    whose last uevent is `remove` is gone: the kernel sends it once the block's files are
    removed, before its directory goes."""
    if previous is None:
        size = read_block_size(root)
        blocks = _read_blocks(root, block_indexes(root))
        return MemoryBlocks(size, tuple(b for b in blocks.values() if b), read_auto_online(root))
    if not changed:
        policy = read_auto_online(root)
        return previous if policy == previous.auto_online else \
            MemoryBlocks(previous.block_size, auto_online=policy, runs=previous.runs)
    again = _read_blocks(root, sorted(i for i, action in changed.items() if action != "remove"))
    again.update((i, None) for i, action in changed.items() if action == "remove")
    return previous.with_blocks(again, read_auto_online(root))


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
