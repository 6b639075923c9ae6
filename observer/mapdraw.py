"""`memhp-observer map`: a picture of the physical address space, so that a leak is seen at a
glance: zones per node, memory blocks by state, the resources hotplug touches, ZONE_DEVICE
pagemaps (known from a trace's events) and the anomalies, each a band over its range.

Physical memory is sparse (a few GiB of RAM, a hole, a DIMM window, device ranges near the top
of a 46-bit space), so the axis is cut at every edge that any band has, and each piece gets a
width that grows with the log of its size: a 128 MiB block stays visible next to a TiB gap, and
every edge is labelled with its address."""

import math
from bisect import bisect_right

from .formats import block_ranges, hotplug_resources

ZONE_COLORS = {"DMA": "#c6dbef", "DMA32": "#9ecae1", "Normal": "#4292c6", "Movable": "#74c476",
               "Device": "#fd8d3c"}
STATE_COLORS = {"online": "#31a354", "offline": "#bdbdbd", "going-offline": "#fd8d3c"}
RESOURCE_COLORS = {"system_ram": "#238b45", "system_ram_driver_managed": "#66c2a4",
                   "driver_parent": "#b2e2e2", "persistent_memory": "#807dba",
                   "persistent_memory_legacy": "#9e9ac8", "device": "#bcbddc",
                   "soft_reserved": "#dadaeb", "cxl_window": "#efedf5", "reserved": "#f0f0f0"}
ANOMALY_COLORS = {"critical": "#e31a1c", "warning": "#fd8d3c", "info": "#6baed6"}


class Axis:
    """Addresses to x: piecewise linear between the sorted edges, a piece's width 1 + log2 of
    its size in MiB (at least 1)."""

    def __init__(self, edges):
        self.edges = sorted(set(edges))
        self.xs = [0.0]
        for lo, hi in zip(self.edges, self.edges[1:]):
            self.xs.append(self.xs[-1] + 1 + math.log2(max(1.0, (hi - lo) / (1 << 20))))

    def x(self, address):
        i = min(max(bisect_right(self.edges, address) - 1, 0), len(self.edges) - 2)
        lo, hi = self.edges[i], self.edges[i + 1]
        return self.xs[i] + (self.xs[i + 1] - self.xs[i]) * (address - lo) / (hi - lo)


def _address(n):
    """An edge's label: whole GiB or MiB where it is one, else hex."""
    for unit, shift in (("G", 30), ("M", 20)):
        if n % (1 << shift) == 0 and (n >> shift) < 1024:
            return f"{n >> shift}{unit}"
    return f"{n:#x}"


def bands(snap, anomalies=(), pagemaps=()):
    """(row, label, start, end (exclusive, bytes), color, text) for everything drawn."""
    page = snap.page_size
    out = []
    for z in snap.zones:
        if z.spanned and z.start_pfn is not None:
            out.append((f"node {z.node} zones", z.name, z.start_pfn * page, z.end_pfn * page,
                        ZONE_COLORS.get(z.name, "#969696"), z.name))
    for r in block_ranges(snap.blocks):
        label = r["state"] + (f" {r['zone']}" if r["zone"] else "")
        out.append(("memory blocks", label, r["start"], r["end"] + 1,
                    STATE_COLORS.get(r["state"], "#969696"), label))
    for r in hotplug_resources(snap.resources or []):
        if r["type"] != "reserved":
            out.append(("resources", r["type"], r["start"], r["end"] + 1,
                        RESOURCE_COLORS.get(r["type"], "#d9d9d9"), r["name"]))
    for p in pagemaps:
        for lo, hi in p["ranges"]:
            out.append(("pagemaps", p["type"], lo * page, hi * page, "#fdae6b", p["type"]))
    for a in anomalies:   # a row per kind: a leak and its neighbour do not hide each other
        if a.start_pfn is not None:
            out.append((a.kind, a.severity, a.start_pfn * page, a.end_pfn * page,
                        ANOMALY_COLORS[a.severity], a.kind))
    return out


def draw(path, snap, anomalies=(), pagemaps=(), title=None):
    """Write the picture to path (.png or .svg, by its suffix)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    drawn = bands(snap, anomalies, pagemaps)
    rows = list(dict.fromkeys(b[0] for b in drawn))
    axis = Axis([e for b in drawn for e in (b[2], b[3])])
    fig, ax = plt.subplots(figsize=(max(10, axis.xs[-1] / 6), 1.2 + 0.8 * len(rows)))
    legend = {}
    for row, label, lo, hi, color, text in drawn:
        y = len(rows) - 1 - rows.index(row)
        x0, x1 = axis.x(lo), axis.x(hi)
        ax.broken_barh([(x0, x1 - x0)], (y + 0.1, 0.8), facecolors=color, edgecolor="#525252",
                       linewidth=0.5, alpha=0.85)
        if x1 - x0 > 1.5:
            ax.text((x0 + x1) / 2, y + 0.5, text, ha="center", va="center", fontsize=7,
                    clip_on=True)
        legend.setdefault(label, color)
    ax.set_yticks([len(rows) - 1 - i + 0.5 for i in range(len(rows))], rows)
    ax.set_xticks(axis.xs, [_address(e) for e in axis.edges], rotation=90, fontsize=6)
    ax.set_xlim(0, axis.xs[-1])
    ax.set_ylim(0, len(rows))
    ax.set_xlabel("physical address (each piece's width grows with the log of its size)")
    ax.legend(handles=[Patch(color=c, label=label) for label, c in legend.items()],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    ax.set_title(title or f"memory hotplug map: kernel {snap.kernel or 'unknown'}")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
