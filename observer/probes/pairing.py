"""Who a teardown belongs to. A removal's stack names the path that set it off (a sysfs unbind
ends a fsdax namespace's pagemap), not the driver that made what goes; the add it undoes does.
So every removal is paired with its add, in call order: by pgmap pointer (ZONE_DEVICE) or by the
pfn range an add covered (System RAM, and ZONE_DEVICE on kernels whose removal calls carry no
pgmap). A range is added only once, so a new add drops the older adds it overlaps (dax/kmem adds
System RAM inside the range a devdax pagemap covered before it was unmapped). A paired removal takes the add's origin, keeps its own as `trigger` and names the add's seq in
`paired_with`. Pure: events in, the same events out."""

ADDS = ("devm_memremap_pages", "memremap_pages", "arch_add_memory", "add_pages")
REMOVES = ("memunmap_pages", "__remove_pages", "arch_remove_memory", "try_remove_memory",
           "release_mem_region_adjustable")


def _span(event):
    """[first pfn, end pfn) of an event, or None."""
    if "start_pfn" in event and event.get("nr_pages"):
        return event["start_pfn"], event["start_pfn"] + event["nr_pages"]
    return None


class Pairing:
    def __init__(self):
        self.by_pgmap = {}     # pgmap pointer -> the add event that mapped it
        self.unmapped = set()  # pointers memunmap_pages was called on: the next map is new
        self.by_span = {}      # (first pfn, end pfn) -> the add event

    def feed(self, event):
        if event.get("type") != "event":
            return event
        pgmap = (event.get("pgmap") or {}).get("ptr")
        if event["fn"] in ADDS and event["ret"] in (0, "ok"):
            if pgmap and (pgmap not in self.by_pgmap or pgmap in self.unmapped):
                self.by_pgmap[pgmap] = event      # nested calls keep the outermost map
                self.unmapped.discard(pgmap)
            span = _span(event)
            if span:
                # a range is added only once: an older add it overlaps was removed meanwhile
                self.by_span = {(lo, hi): a for (lo, hi), a in self.by_span.items()
                                if hi <= span[0] or span[1] <= lo}
                self.by_span[span] = self.by_pgmap.get(pgmap, event)
        elif event["fn"] in REMOVES:
            add = self.by_pgmap.get(pgmap) if pgmap else None
            span = _span(event)
            if add is None and span:
                add = next((a for (lo, hi), a in self.by_span.items()
                            if lo <= span[0] and span[1] <= hi), None)
            if add is not None:
                event = dict(event, trigger=event["origin"], origin=add["origin"],
                             paired_with=add["seq"])
            if event["fn"] == "memunmap_pages" and pgmap:
                self.unmapped.add(pgmap)
        return event
