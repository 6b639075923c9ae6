"""/proc/zoneinfo (mm/vmstat.c zoneinfo_show_print).

Every zone of every online node is printed. A zone with present_pages == 0 stops after the
protection line: no start_pfn (kernel-reference.md §4.1), so start_pfn is None for it."""

from __future__ import annotations

import re
from collections import namedtuple

from .source import ViewError, excerpt, read_view, view_lines, view_path

ZONEINFO = "/proc/zoneinfo"

_HEADER = re.compile(r"^Node ([0-9]+), zone\s+(\S+)$")
_NUMBER = re.compile(r"^[0-9]+$")
_COUNTERS = ("spanned", "present", "managed")
# mm/page_alloc.c zone_names[] (HighMem is 32-bit only); "none" is valid_zones' word, not a zone
ZONE_NAMES = ("DMA", "DMA32", "Normal", "HighMem", "Movable", "Device")
# NODES_SHIFT is at most 10 on every architecture: no kernel numbers a node 1024 or above
MAX_NODES = 1 << 10
ULONG_LIMIT = 1 << 64   # the counters are unsigned long


class Zone(namedtuple("Zone", [
        "node", "name",
        "start_pfn",   # None when the kernel prints none (unpopulated zone)
        "spanned", "present", "managed",
        "line",        # the zone's "Node N, zone Z" line, for evidence
], defaults=(0,))):
    __slots__ = ()

    @property
    def end_pfn(self):
        """One past the last spanned pfn, or None when the start is not shown."""
        return None if self.start_pfn is None else self.start_pfn + self.spanned


def parse_zoneinfo(text, path=ZONEINFO):
    zones = []
    current = None  # dict of the zone being read, with the line of its header

    seen = {}       # (node, zone) -> line of its header

    def finish():
        if current is None:
            return
        where = f"zone {current['name']} of node {current['node']}"
        lacking = [c for c in _COUNTERS if c not in current]
        if lacking:
            raise ViewError(path, f"{where} has no {', '.join(lacking)} line", current["line"])
        _check_zone(current, where, path)
        zones.append(Zone(current["node"], current["name"], current.get("start_pfn"),
                          current["spanned"], current["present"], current["managed"], current["line"]))

    for lineno, raw in enumerate(view_lines(text), 1):
        line = raw.strip()
        if line.startswith("Node "):
            m = _HEADER.match(line)
            if not m:
                raise ViewError(path, f"unexpected zone header {excerpt(raw)}", lineno)
            finish()
            node, name = int(m.group(1)), m.group(2)
            if node >= MAX_NODES:
                raise ViewError(path, f"node {node} is beyond any kernel's {MAX_NODES} nodes", lineno)
            if name not in ZONE_NAMES:
                raise ViewError(path, f"unknown zone {excerpt(name)} (the kernel's zones are "
                                      f"{', '.join(ZONE_NAMES)})", lineno)
            if (node, name) in seen:
                raise ViewError(path, f"zone {name} of node {node} is listed twice (first at line "
                                      f"{seen[node, name]})", lineno)
            seen[node, name] = lineno
            current = {"node": node, "name": name, "line": lineno}
            continue
        key, _, value = line.partition(" ")
        key = key.rstrip(":")
        if key in _COUNTERS or key == "start_pfn":
            if current is None:
                raise ViewError(path, f"{key} before any 'Node N, zone Z' header", lineno)
            if key in current:
                raise ViewError(path, f"{key} repeated in zone {current['name']}", lineno)
            value = value.strip()
            if not _NUMBER.match(value):
                raise ViewError(path, f"{key} is not a number: {excerpt(raw)}", lineno)
            if int(value) >= ULONG_LIMIT:
                raise ViewError(path, f"{key} {value} does not fit the kernel's unsigned long", lineno)
            current[key] = int(value)
    finish()
    if not zones:
        raise ViewError(path, "no zones found")
    return zones


def _check_zone(z, where, path):
    """What every zone the kernel prints satisfies, even mid-hotplug. online_pages grows the span
    before present, and offline_pages shrinks present before the span, so present never exceeds
    spanned. (managed may exceed present for a moment: online_pages frees the new pages, growing
    managed, before it adjusts present; so that is not checked.)"""
    if z["present"] > z["spanned"]:
        raise ViewError(path, f"{where}: present {z['present']} exceeds spanned {z['spanned']}",
                        z["line"])
    # zoneinfo_show_print stops before start_pfn exactly when the zone has no present page
    if z["present"] and "start_pfn" not in z:
        raise ViewError(path, f"{where} has {z['present']} present pages but no start_pfn line",
                        z["line"])
    if not z["present"] and "start_pfn" in z:
        raise ViewError(path, f"{where} has no present page, yet a start_pfn line", z["line"])
    if z.get("start_pfn", 0) + z["spanned"] > ULONG_LIMIT:
        raise ViewError(path, f"{where} spans past the last pfn an unsigned long holds", z["line"])


def read_zoneinfo(root="/"):
    return parse_zoneinfo(read_view(root, ZONEINFO), view_path(root, ZONEINFO))
