"""All human-readable text: `snapshot`, anomalies (the JSON shapes live in formats.py)."""

from .formats import snapshot_json


def _size(n):
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B" if n < 1024 else f"{n / (1 << 20):.1f}M"


def snapshot_text(snap):
    doc = snapshot_json(snap)
    out = [f"kernel {doc['kernel'] or 'unknown'}, root {doc['root']}, page size {doc['page_size']}, "
           f"block size {_size(doc['block_size'])}", "", "ZONES"]
    out.append(f"{'NODE':>4} {'ZONE':<8} {'START_PFN':>12} {'END_PFN':>12} {'SPANNED':>10} "
               f"{'PRESENT':>10} {'MANAGED':>10}")
    for z in doc["zones"]:
        start = "-" if z["start_pfn"] is None else f"{z['start_pfn']:#x}"
        end = "-" if z["end_pfn"] is None else f"{z['end_pfn']:#x}"
        out.append(f"{z['node']:>4} {z['zone']:<8} {start:>12} {end:>12} {z['spanned_pages']:>10} "
                   f"{z['present_pages']:>10} {z['managed_pages']:>10}")
    out += ["", "MEMORY BLOCKS", f"{'RANGE':<37} {'SIZE':>6} {'STATE':<13} {'ZONE':<8} {'NODE':>4}  BLOCKS"]
    for r in doc["memory_blocks"]:
        blocks = f"{r['first_block']}" if r["first_block"] == r["last_block"] else \
            f"{r['first_block']}-{r['last_block']}"
        node = "-" if r["node"] is None else r["node"]
        out.append(f"{r['start']:#018x}-{r['end']:#018x} {_size(r['size']):>6} {r['state']:<13} "
                   f"{r['zone'] or '-':<8} {node:>4}  {blocks}")
    out += ["", "RESOURCES"]
    if doc["resources"] is None:
        out.append(f"  unavailable: {doc['iomem_error']}")
    else:
        for r in doc["resources"]:
            under = f"  (under {r['parent']})" if r["parent"] else ""
            out.append(f"{r['start']:#018x}-{r['end']:#018x} {_size(r['size']):>6} "
                       f"{r['type']:<26} {r['name']}{under}")
    s = doc["summary"]
    states = ", ".join(f"{v} {k}" for k, v in sorted(s["blocks_by_state"].items()))
    out += ["", f"summary: {s['nodes']} node(s), {s['zones_populated']} populated zone(s); "
                f"{s['blocks']} memory blocks ({states}), {_size(s['online_bytes'])} online; "
                f"{_size(s['driver_managed_ram_bytes']) if s['driver_managed_ram_bytes'] else 'no'} "
                f"driver-managed System RAM"]
    return "\n".join(out)


def anomaly_headline(a):
    """One line: severity, kind, where, and the sentence (the daemon logs this)."""
    where = []
    if a.node is not None:
        where.append(f"node {a.node}")
    if a.zone:
        where.append(a.zone)
    if a.start_pfn is not None:
        where.append(f"pfn {a.start_pfn:#x}-{a.end_pfn:#x}")
    return f"{a.severity:<8} {a.kind} ({', '.join(where)}): {a.message}" if where else \
        f"{a.severity:<8} {a.kind}: {a.message}"


def anomaly_line(a):
    """The headline, then the evidence, a line each."""
    return "\n".join([anomaly_headline(a)] + [f"         evidence: {e}" for e in a.evidence])
