"""One BPF event (program.Event) into one trace event (DESIGN.md §4, trace v1): the arguments
the function's shape says it carries, its return value, and the origin derived from the kernel
stack at entry."""

import re

# enum memory_type names (from BTF) -> the trace's pgmap types
PGMAP_TYPES = {"MEMORY_DEVICE_PRIVATE": "private", "MEMORY_DEVICE_COHERENT": "coherent",
               "MEMORY_DEVICE_FS_DAX": "fsdax", "MEMORY_DEVICE_GENERIC": "devdax",
               "MEMORY_DEVICE_DEVDAX": "devdax", "MEMORY_DEVICE_PCI_P2PDMA": "p2pdma"}

# Who asked, from the symbols on the stack: the frame nearest the probed function that matches
# wins (a devdax namespace's probe runs under the nvdimm bus, a kmem removal under a sysfs
# unbind). Module names come from kallsyms as "function [module]".
ORIGINS = (
    ("kmem", re.compile(r"^dev_dax_kmem_|\[kmem\]")),
    ("virtio_mem", re.compile(r"^virtio_mem_|\[virtio_mem\]")),
    ("acpi", re.compile(r"^acpi_memory_|\[acpi_memhotplug\]")),
    ("hmm", re.compile(r"^dmirror_|\[test_hmm\]")),
    ("fsdax", re.compile(r"^pmem_attach_disk|^nvdimm_setup_pfn|\[nd_pmem\]")),
    ("devdax", re.compile(r"^dev_dax_probe|^devm_create_dev_dax|\[device_dax\]|\[dax_pmem\]")),
    ("sysfs", re.compile(r"^state_store|^online_store|^kernfs_fop_write")),
)
_MODULE = re.compile(r"\[(\w+)\]$")


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


def _from_own_frame(function, frames):
    """The stack from the function's own frame on: kprobe stacks start there, fentry stacks
    start in the BPF program and trampoline that the function's entry calls."""
    own = [i for i, f in enumerate(frames) if f.split(" ")[0] == function]
    return frames[own[0]:] if own else frames


def _int32(value):
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _ret(shape, raw):
    if shape.returns == "void":
        return None
    if shape.returns == "int":
        return _int32(raw)
    # pointers: an ERR_PTR is a negative errno, NULL is 0, anything else "ok"
    return raw if -4095 <= raw < 0 else (0 if raw == 0 else "ok")


def decode(ev, shape, layouts, page_size, frames):
    """A trace event dict from one Event; frames: the entry stack, innermost first, symbolized."""
    roles = {r for _, r in shape.roles}
    frames = _from_own_frame(shape.function, frames)
    out = {"type": "event", "seq": ev.seq, "ts_ns": ev.ts_ns, "fn": shape.function,
           "duration_ns": ev.duration_ns, "ret": _ret(shape, ev.ret), "pid": ev.pid,
           "tid": ev.tid, "comm": ev.comm.decode(errors="replace"),
           "caller": frames[1] if len(frames) > 1 else None, "origin": origin(frames),
           "stack": frames}
    if "nid" in roles:
        out["nid"] = ev.nid
    if "start" in roles:
        out["start"], out["size"] = ev.start, ev.size
        out["start_pfn"], out["nr_pages"] = ev.start // page_size, ev.size // page_size
    if "start_pfn" in roles:
        out["start_pfn"], out["nr_pages"] = ev.start_pfn, ev.nr_pages
    if "zone" in roles:
        out["nid"] = ev.zone_nid
        out["zone"] = layouts.zone_names.get(ev.zone_idx, str(ev.zone_idx))
        out["span_before"] = {"start_pfn": ev.span_start_before, "spanned": ev.span_pages_before}
        out["span_after"] = {"start_pfn": ev.span_start_after, "spanned": ev.span_pages_after}
    if "params" in roles:
        out["zone_device"] = bool(ev.zone_device)
    if "pgmap" in roles or ev.pgmap_ptr:
        kind = layouts.memory_types.get(ev.pgmap_type, str(ev.pgmap_type))
        out["pgmap"] = {"type": PGMAP_TYPES.get(kind, kind), "nr_range": ev.pgmap_nr_range,
                        "ranges": [[ev.pgmap_start, ev.pgmap_end]]}
    if "res" in roles or shape.returns == "resource" or "name" in roles:
        res = {"name": ev.res_name.decode(errors="replace")}
        if ev.res_end:
            res.update(start=ev.res_start, end=ev.res_end, flags=ev.res_flags)
        out["resource"] = res
    return out
