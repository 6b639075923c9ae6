"""The JSON shapes (DESIGN.md §4), a writer and a reader beside each: `snapshot --json`, and the
trace's snapshot record. A snapshot record is what the model judges, live and in replay alike,
so it carries everything the model reads: the zones, the memory blocks as ranges, the whole
iomem tree, and when its views were read (read_start_ns..ts_ns, CLOCK_MONOTONIC like the
probes' ts_ns)."""

from __future__ import annotations


from .snapshot import Snapshot
from .views import iomem, memory_blocks
from .views.zoneinfo import Zone


MAX_BLOCKS = 1 << 24   # memory blocks in one snapshot: 2 PiB of 128 MiB blocks


class RecordError(ValueError):
    """A record whose fields do not have the shape of this format."""


def block_ranges(blocks):
    """Runs of consecutive blocks with the same state, zone and node, as lsmem prints them."""
    size = blocks.block_size
    return [{"start": r.first * size, "end": (r.last + 1) * size - 1,
             "size": (r.last - r.first + 1) * size, "state": r.state, "zone": r.zone_word,
             "node": r.node, "first_block": r.first, "last_block": r.last} for r in blocks.runs]


def hotplug_resources(roots):
    """The resources hotplug touches, each with its type label and its parent's name."""
    out = []
    for res, parent in iomem.walk(roots):
        kind = iomem.resource_type(res, parent)
        if kind is not None:
            out.append({"start": res.start, "end": res.end, "size": res.size, "name": res.name,
                        "type": kind, "parent": parent.name if parent else None, "line": res.line})
    return out


def zones_json(zones):
    return [{"node": z.node, "zone": z.name, "start_pfn": z.start_pfn, "end_pfn": z.end_pfn,
             "spanned_pages": z.spanned, "present_pages": z.present, "managed_pages": z.managed}
            for z in zones]


def snapshot_json(snap):
    """The stable --json shape (README "snapshot --json"); bump `version` on any required change."""
    resources = hotplug_resources(snap.resources) if snap.resources is not None else None
    return {"format": "memhp-snapshot", "version": 1, "root": snap.root, "kernel": snap.kernel,
            "page_size": snap.page_size, "block_size": snap.blocks.block_size,
            "auto_online_blocks": snap.blocks.auto_online, "zones": zones_json(snap.zones), "memory_blocks": block_ranges(snap.blocks),
            "resources": resources, "iomem_error": snap.iomem_error, "summary": summary(snap)}


def summary(snap):
    states = {}
    for r in snap.blocks.runs:
        states[r.state] = states.get(r.state, 0) + r.last - r.first + 1
    driver = [r for r, _ in iomem.walk(snap.resources or []) if r.is_driver_managed]
    return {"nodes": len({z.node for z in snap.zones}),
            "zones_populated": sum(1 for z in snap.zones if z.present),
            "blocks": snap.blocks.count(), "blocks_by_state": states,
            "online_bytes": states.get("online", 0) * snap.blocks.block_size,
            "driver_managed_ram_bytes": sum(r.size for r in driver)}


def snapshot_record(snap, read_start_ns, read_end_ns, calls_before=None):
    """The trace's snapshot record. calls_before: every probed call numbered below it entered
    before this read ended, and the trace holds its event (or begun/skipped record) before this
    one; 0 when no probe runs (procfs mode); None when unknown."""
    rec = {"type": "snapshot", "ts_ns": read_end_ns, "read_start_ns": read_start_ns,
           "zones": zones_json(snap.zones), "memory_blocks": block_ranges(snap.blocks),
           "resources": hotplug_resources(snap.resources) if snap.resources is not None else None,
           "iomem": None if snap.resources is None else
           [[r.start, r.end, r.depth, r.name] for r, _ in iomem.walk(snap.resources)],
           "auto_online_blocks": snap.blocks.auto_online}
    if calls_before is not None:
        rec["calls_before"] = calls_before
    return rec


def _int(rec, key, optional=False):
    value = rec.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RecordError(f"{key} is {value!r}, not a non-negative integer")
    return value


def snapshot_from_record(rec, header) -> Snapshot:
    """The Snapshot a snapshot record was written from, in the page and block size of the
    trace's header. Offline blocks come back without the zones they could go to (the record
    keeps only an online block's zone); traces written before the record kept the whole iomem
    tree give back the hotplug resources, flat."""
    try:
        page_size, block_size = _int(header, "page_size"), _int(header, "block_size")
        if not page_size or not block_size or block_size % page_size:
            raise RecordError(f"page size {page_size} and block size {block_size} do not fit")
        zones = []
        for z in rec["zones"]:
            zones.append(Zone(node=_int(z, "node"), name=str(z["zone"]),
                              start_pfn=_int(z, "start_pfn", optional=True),
                              spanned=_int(z, "spanned_pages"), present=_int(z, "present_pages"),
                              managed=_int(z, "managed_pages"), line=0))
        runs, count = [], 0
        for r in rec["memory_blocks"]:
            state, zone = r["state"], r.get("zone")
            if state not in memory_blocks.STATES:
                raise RecordError(f"memory block state {state!r}")
            if zone is not None and not isinstance(zone, str):
                raise RecordError(f"memory block zone {zone!r}")
            node = _int(r, "node", optional=True)
            first, last = _int(r, "first_block"), _int(r, "last_block")
            count += last - first + 1
            if runs and first <= runs[-1].last or last < first or count > MAX_BLOCKS:
                raise RecordError(f"memory blocks {first}-{last} out of order or too many")
            runs.append(memory_blocks.BlockRun.alike(first, last, state, zone, node))
        resources = _resources(rec)
        policy = rec.get("auto_online_blocks")
        if policy is not None and not isinstance(policy, str):
            raise RecordError(f"auto_online_blocks {policy!r} is not a word")
    except (KeyError, TypeError, AttributeError) as e:
        raise RecordError(f"snapshot record without a well-formed {e}") from None
    return Snapshot(root="trace", kernel=header.get("kernel"), page_size=page_size, zones=zones,
                    blocks=memory_blocks.MemoryBlocks(block_size, auto_online=policy, runs=runs),
                    resources=resources,
                    iomem_error=None if resources is not None else "not in the trace")


def _resources(rec) -> list | None:
    if rec.get("iomem") is not None:
        roots, stack = [], []
        for line, (start, end, depth, name) in enumerate(rec["iomem"], 1):
            if not all(isinstance(v, int) and v >= 0 for v in (start, end, depth)) \
                    or depth > len(stack):
                raise RecordError(f"iomem entry {line} is not [start, end, depth, name]")
            res = iomem.Resource(start, end, str(name), depth, line)
            del stack[depth:]
            (stack[-1].children if stack else roots).append(res)
            stack.append(res)
        return roots
    if rec.get("resources") is None:
        return None
    return [iomem.Resource(_int(r, "start"), _int(r, "end"), str(r["name"]), 0,
                           r.get("line", 0)) for r in rec["resources"]]
