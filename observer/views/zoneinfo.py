"""/proc/zoneinfo (mm/vmstat.c zoneinfo_show_print).

Every zone of every online node is printed. A zone with present_pages == 0 stops after the
protection line: no start_pfn (kernel-reference.md §4.1), so start_pfn is None for it."""

import re
from dataclasses import dataclass
from typing import Optional

from .source import ViewError, read_view, view_path

ZONEINFO = "/proc/zoneinfo"

_HEADER = re.compile(r"^Node (\d+), zone\s+(\S+)$")
_COUNTERS = ("spanned", "present", "managed")


@dataclass(frozen=True)
class Zone:
    node: int
    name: str
    start_pfn: Optional[int]  # None when the kernel prints none (unpopulated zone)
    spanned: int
    present: int
    managed: int
    line: int = 0             # the zone's "Node N, zone Z" line, for evidence

    @property
    def end_pfn(self):
        """One past the last spanned pfn, or None when the start is not shown."""
        return None if self.start_pfn is None else self.start_pfn + self.spanned


def parse_zoneinfo(text, path=ZONEINFO):
    zones = []
    current = None  # dict of the zone being read, with the line of its header

    def finish():
        if current is None:
            return
        lacking = [c for c in _COUNTERS if c not in current]
        if lacking:
            raise ViewError(path, f"zone {current['name']} of node {current['node']} has no "
                                  f"{', '.join(lacking)} line", current["line"])
        zones.append(Zone(current["node"], current["name"], current.get("start_pfn"),
                          current["spanned"], current["present"], current["managed"], current["line"]))

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("Node "):
            m = _HEADER.match(line)
            if not m:
                raise ViewError(path, f"unexpected zone header {raw!r}", lineno)
            finish()
            current = {"node": int(m.group(1)), "name": m.group(2), "line": lineno}
            continue
        key, _, value = line.partition(" ")
        key = key.rstrip(":")
        if key in _COUNTERS or key == "start_pfn":
            if current is None:
                raise ViewError(path, f"{key} before any 'Node N, zone Z' header", lineno)
            if key in current:
                raise ViewError(path, f"{key} repeated in zone {current['name']}", lineno)
            try:
                current[key] = int(value.strip())
            except ValueError:
                raise ViewError(path, f"{key} is not a number: {raw!r}", lineno) from None
    finish()
    if not zones:
        raise ViewError(path, "no zones found")
    return zones


def read_zoneinfo(root="/"):
    return parse_zoneinfo(read_view(root, ZONEINFO), view_path(root, ZONEINFO))
