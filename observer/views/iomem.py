"""/proc/iomem as a tree (kernel/resource.c r_show, kernel-reference.md §4.2).

Each line is "start-end : name", hex, indented two spaces per nesting level. Without
CAP_SYS_ADMIN in the init user namespace the kernel prints every address as zero: that is
detected and reported, never read as a map of empty ranges."""

from __future__ import annotations

import re
from collections import namedtuple

from .source import ViewError, excerpt, read_view, view_lines, view_path

IOMEM = "/proc/iomem"
# r_show indents by nesting depth but stops counting at MAX_IORES_LEVEL: a resource nested
# deeper is printed at that level, beside its own parent, so the tree is exact only above it
MAX_IORES_LEVEL = 5

_LINE = re.compile(r"^( *)([0-9a-f]+)-([0-9a-f]+) : (.*)$")

SYSTEM_RAM = "System RAM"
# virtio-mem claims its whole device region at the top level as "virtioN" (virtio-pci BARs
# nest under their PCI device instead)
_VIRTIO_MEM_DEVICE = re.compile(r"^virtio\d+$")


class IomemHidden(ViewError):
    """/proc/iomem read without CAP_SYS_ADMIN: every address zero. The one iomem failure the
    other views are still shown without; any other is an error like every view's."""


class Resource(namedtuple("Resource", [
        "start",
        "end",         # inclusive, as the kernel prints it
        "name", "depth",
        "line",        # line in /proc/iomem, for evidence
        "children",    # [Resource], filled as the lines below it are read
], defaults=(None,))):
    __slots__ = ()

    def __new__(cls, start, end, name, depth, line, children=None):
        return super().__new__(cls, start, end, name, depth, line,
                               [] if children is None else children)

    @property
    def size(self):
        return self.end - self.start + 1

    @property
    def is_system_ram(self):
        """"System RAM" and its driver-managed variants "System RAM (kmem)", "(virtio_mem)"..."""
        return self.name == SYSTEM_RAM or self.name.startswith(SYSTEM_RAM + " (")

    @property
    def is_driver_managed(self):
        return self.name.startswith(SYSTEM_RAM + " (")

    def walk(self, parent=None):
        yield self, parent
        for child in self.children:
            yield from child.walk(self)


def parse_iomem(text, path=IOMEM):
    roots = []
    stack = []  # the open resources, outermost first
    count = 0
    for lineno, raw in enumerate(view_lines(text), 1):
        if not raw.strip():
            continue
        m = _LINE.match(raw)
        if not m:
            raise ViewError(path, f"not 'start-end : name': {excerpt(raw)}", lineno)
        indent, start, end, name = m.groups()
        if len(indent) % 2:
            raise ViewError(path, f"odd indentation ({len(indent)} spaces)", lineno)
        depth = len(indent) // 2
        if depth > MAX_IORES_LEVEL:
            raise ViewError(path, f"nested {depth} levels deep; the kernel prints at most "
                                  f"{MAX_IORES_LEVEL}", lineno)
        if depth > len(stack):
            raise ViewError(path, f"nested {depth} levels under a parent at level {len(stack) - 1}", lineno)
        if len(start) > 16 or len(end) > 16:
            raise ViewError(path, "address wider than 64 bits", lineno)
        res = Resource(int(start, 16), int(end, 16), name, depth, lineno)
        if res.end < res.start:
            raise ViewError(path, f"end {end} before start {start}", lineno)
        siblings = stack[depth - 1].children if depth else roots
        del stack[depth:]
        if stack:
            parent = stack[-1]
            if not (parent.start <= res.start and res.end <= parent.end) and not _zeroed(res):
                raise ViewError(path, f"{excerpt(name)} is not inside its parent "
                                      f"{excerpt(parent.name)} (line {parent.line})", lineno)
        # the kernel keeps siblings sorted and apart (a request that overlaps one fails)
        if siblings and depth < MAX_IORES_LEVEL and not _zeroed(res) \
                and siblings[-1].end >= res.start:
            before = siblings[-1]
            raise ViewError(path, f"{excerpt(name)} {start}-{end} overlaps or precedes "
                                  f"{excerpt(before.name)} {before.start:x}-{before.end:x} (line "
                                  f"{before.line}) at the same level", lineno)
        siblings.append(res)
        stack.append(res)
        count += 1
    if count == 0:
        raise ViewError(path, "no resources")
    if all(_zeroed(r) for root in roots for r, _ in root.walk()):
        raise IomemHidden(path, "every address reads as zero: the kernel hides /proc/iomem "
                                "addresses without CAP_SYS_ADMIN; run as root")
    return roots


def _zeroed(res):
    return res.start == 0 and res.end == 0


def walk(roots):
    """Every resource with its parent (None at the top), in file order."""
    for root in roots:
        yield from root.walk()


def read_iomem(root="/"):
    return parse_iomem(read_view(root, IOMEM), view_path(root, IOMEM))


def resource_type(res, parent):
    """A bounded label for a resource hotplug cares about, or None for everything else
    (PCI bars, ACPI tables, kernel code...). Names are the kernel's (kernel-reference.md §4.2)."""
    name = res.name
    if name == SYSTEM_RAM:
        return "system_ram"
    if res.is_driver_managed:
        return "system_ram_driver_managed"   # "System RAM (kmem)", "(virtio_mem)", ...
    if any(c.is_driver_managed for c in res.children):
        return "driver_parent"                # daxX.Y, virtioN
    if parent is None and _VIRTIO_MEM_DEVICE.match(name):
        return "driver_parent"                # virtio-mem's device region, kept while unplugged
    if name == "Persistent Memory":
        return "persistent_memory"
    if name == "Persistent Memory (legacy)":
        return "persistent_memory_legacy"
    if name == "Soft Reserved":
        return "soft_reserved"
    if name.startswith("CXL Window"):
        return "cxl_window"
    if parent is not None and resource_type(parent, None) in (
            "persistent_memory", "persistent_memory_legacy", "soft_reserved", "cxl_window"):
        return "device"                       # namespaceX.Y, daxX.Y, regionN under the above
    if name == "Reserved" and parent is None:
        return "reserved"
    return None
