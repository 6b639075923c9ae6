"""One BPF event (program.Event) into one trace event (DESIGN.md §4, trace v1): the arguments
the function's shape says it carries, its return value, and the origin derived from the kernel
stack at entry."""

import functools
import re

from .program import MAX_RANGES

# mhp_t flags (include/linux/memory_hotplug.h; #defines, so not in BTF; kernel-reference.md
# §3.3). 5.10 has only bit 0 (MEMHP_MERGE_RESOURCE); the others came later with these values.
MHP_FLAGS = {0: "MHP_MERGE_RESOURCE", 1: "MHP_MEMMAP_ON_MEMORY", 2: "MHP_NID_IS_MGID"}
MHP_NID_IS_MGID = 1 << 2

# Who asked, from the symbols on the stack: the frame nearest the probed function that matches
# wins (a devdax namespace's probe runs under the nvdimm bus, a kmem removal under a sysfs
# unbind). Module names come from kallsyms as "function [module]".
ORIGINS = (
    ("kmem", re.compile(r"^dev_dax_kmem_|\[kmem\]")),
    ("virtio_mem", re.compile(r"^virtio_mem_|\[virtio_mem\]")),
    # an ACPI eject offlines the device's blocks from the hotplug work, before removing them
    ("acpi", re.compile(r"^acpi_memory_|^acpi_scan_hot_remove|^acpi_bus_offline|\[acpi_memhotplug\]")),
    ("hmm", re.compile(r"^dmirror_|\[test_hmm\]")),
    ("fsdax", re.compile(r"^pmem_attach_disk|^nvdimm_setup_pfn|\[nd_pmem\]")),
    ("devdax", re.compile(r"^dev_dax_probe|^devm_create_dev_dax|\[device_dax\]|\[dax_pmem\]")),
    ("sysfs", re.compile(r"^state_store|^online_store|^kernfs_fop_write")),
)
_MODULE = re.compile(r"\[(\w+)\]$")


@functools.lru_cache(maxsize=4096)
def _stack_facts(function, frames):
    """(where the stack starts, the caller, the origin) of a symbolized entry stack (a tuple).
    The same few call paths come again and again (a test cycling a block: one path each way),
    and the regexes over every frame were most of an event's decoding."""
    own, caller = _own_frame(function, frames)
    return own, caller, origin(frames[own:])


def origin(frames):
    for f in frames:
        for name, pattern in ORIGINS:
            if pattern.search(f):
                return name
    for f in frames:                       # some other driver module: name it
        m = _MODULE.search(f)
        if m and m.group(1) not in ("kernel", "bpf"):
            return m.group(1)
    return "unknown"


def _own_frame(function, frames):
    """(where the stack starts, the caller). A kprobe stack starts at the function's own frame;
    an fentry stack in the BPF program and trampoline that the function's entry calls, which
    return into the function's frame or, on 7.x, straight into its caller. Where fentry is
    attached too, the function runs called from its trampoline: BPF frames are never the
    caller."""
    own = next((i for i, f in enumerate(frames) if f.split(" ")[0] == function), None)
    if own is None:
        own = next((i for i, f in enumerate(frames) if not f.endswith(" [bpf]")), 0)
        after = own
    else:
        after = own + 1
    return own, next((f for f in frames[after:] if not f.endswith(" [bpf]")), None)


def _int32(value):
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _ret(shape, raw):
    if shape.returns == "void":
        return None
    if shape.returns == "int":
        return _int32(raw)
    # pointers: an ERR_PTR is a negative errno, else "NULL" or "ok"
    return raw if -4095 <= raw < 0 else ("NULL" if raw == 0 else "ok")


def pgmap_type(kernel_name):
    """The trace's name for an enum memory_type value: the kernel's own, without its prefix
    (MEMORY_DEVICE_GENERIC -> "generic"). Which driver made the pgmap is the event's origin."""
    return kernel_name.removeprefix("MEMORY_DEVICE_").lower()


def decode(ev, shape, layouts, page_size, frames):
    """A trace event dict from one Event; frames: the entry stack, innermost first, symbolized
    (ev.stack holds the raw addresses). A call the trace leaves out is a `left_out` record:
    call order still needs its number."""
    if ev.left_out:
        return {"type": "left_out", "seq": ev.seq}
    roles = {r for _, r in shape.roles}
    raw = list(ev.stack[:max(0, ev.stack_bytes) // 8])
    own, caller, said = _stack_facts(shape.function, tuple(frames))
    frames, raw = frames[own:], raw[own:]
    out = {"type": "event", "seq": ev.seq, "ts_ns": ev.ts_ns, "fn": shape.function,
           "duration_ns": ev.duration_ns, "ret": _ret(shape, ev.ret), "pid": ev.pid,
           "tid": ev.tid, "comm": ev.comm.decode(errors="replace"),
           "caller": caller, "origin": said,
           "stack": frames, "stack_addrs": [f"{a:#x}" for a in raw]}
    if "nid" in roles:
        out["nid"] = ev.nid
    if "mhp_flags" in roles:
        out["mhp_flags"] = [name for bit, name in MHP_FLAGS.items() if ev.mhp_flags & (1 << bit)]
        if ev.mhp_flags & MHP_NID_IS_MGID:   # kmem, virtio-mem, ACPI (5.15+) pass a memory group
            out["memory_group"], out["nid"] = ev.nid, None
    if "start" in roles:
        out["start"], out["size"] = ev.start, ev.size
        out["start_pfn"], out["nr_pages"] = ev.start // page_size, ev.size // page_size
    elif "size" in roles:
        out["size"] = ev.size
    if "start_pfn" in roles:
        out["start_pfn"], out["nr_pages"] = ev.start_pfn, ev.nr_pages
    if "zone" in roles:
        out["nid"] = ev.zone_nid
        out["zone"] = layouts.zone_names.get(ev.zone_idx, str(ev.zone_idx))
        out["span_before"] = {"start_pfn": ev.span_start_before, "spanned": ev.span_pages_before,
                              "present": ev.present_before}
        out["span_after"] = {"start_pfn": ev.span_start_after, "spanned": ev.span_pages_after,
                             "present": ev.present_after}
    if "params" in roles:   # unknown (None) where mhp_params has no pgmap (before 5.17)
        out["zone_device"] = None if ev.zone_device < 0 else bool(ev.zone_device)
    if ev.pgmap_ptr:        # a NULL pgmap (System RAM on 6.12's __remove_pages) is no pgmap
        kind = layouts.memory_types.get(ev.pgmap_type, str(ev.pgmap_type))
        n = max(0, min(ev.pgmap_nr_range, MAX_RANGES))
        out["pgmap"] = {"ptr": f"{ev.pgmap_ptr:#x}", "type": pgmap_type(kind),
                        "nr_range": ev.pgmap_nr_range,
                        "ranges": [[ev.pgmap_ranges[2 * i], ev.pgmap_ranges[2 * i + 1]] for i in range(n)]}
    elif "pgmap" in roles:
        out["pgmap"] = None
    if "res" in roles or shape.returns == "resource" or "name" in roles:
        res = {"name": ev.res_name.decode(errors="replace")}
        if ev.res_end:
            res.update(start=ev.res_start, end=ev.res_end, flags=ev.res_flags, desc=ev.res_desc)
        out["resource"] = res
    if ev.blockers:
        out["blocked_by"] = blocker(ev, layouts)
    return out


def blocker(ev, layouts):
    """The page an annotation (dump_page) named during the call, as the kernel would print it:
    pfn, flags by name, refcount, and the kernel's reason ("unmovable page")."""
    size = layouts.sizes["page"]
    offset = ev.blocker_page - ev.blocker_vmemmap
    pfn = offset // size if ev.blocker_vmemmap and 0 <= offset and offset % size == 0 else None
    return {"pfn": pfn, "page": f"{ev.blocker_page:#x}",
            "flags": [name for bit, name in sorted(layouts.page_flags.items())
                      if ev.blocker_flags & (1 << bit)],
            "flags_word": f"{ev.blocker_flags:#x}",   # section, node and zone bits too
            "refcount": ev.blocker_refcount, "reason": ev.blocker_reason.decode(errors="replace"),
            "pages_named": ev.blockers}
