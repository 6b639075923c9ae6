"""Probe shapes: for each watched function, which argument (by position) carries what, read from
the running kernel's BTF. Adding a kernel version adds nothing here as long as the kernel keeps
its parameter names; a renamed parameter is a new entry in ROLE_BY_PARAM.

A role is what the decoder makes of an argument: nid, a byte range (start/size, or a size
alone), a pfn range (start_pfn/nr_pages), a zone (span and present pages read at entry and at
return), a dev_pagemap (pointer, type and ranges), a resource, mhp_params (does it carry a pgmap:
ZONE_DEVICE), mhp_flags, a resource name."""

from __future__ import annotations

from collections import namedtuple

from .functions import ALL

# (parameter name, C type) -> role. Types are BTF's spelling.
ROLE_BY_PARAM = {
    ("nid", "int"): "nid",
    ("start", "u64"): "start", ("start", "resource_size_t"): "start",
    ("size", "u64"): "size", ("size", "resource_size_t"): "size",
    ("pfn", "long unsigned int"): "start_pfn", ("start_pfn", "long unsigned int"): "start_pfn",
    ("phys_start_pfn", "long unsigned int"): "start_pfn",
    ("nr_pages", "long unsigned int"): "nr_pages",
    ("zone", "struct zone *"): "zone",
    ("pgmap", "struct dev_pagemap *"): "pgmap",
    ("res", "struct resource *"): "res",
    ("params", "struct mhp_params *"): "params",
    ("resource_name", "const char *"): "name", ("name", "const char *"): "name",
    ("n", "resource_size_t"): "size",                  # __request_region
    ("size", "long unsigned int"): "size",             # request_free_mem_region and kin
    ("mhp_flags", "mhp_t"): "mhp_flags",
    ("page", "struct page *"): "page", ("page", "const struct page *"): "page",   # dump_page
    ("reason", "const char *"): "reason",
}

# Functions whose successful calls the trace leaves out: __request_region serves every driver's
# region claims; only its failures (a hot-add refused, a conflict) matter here.
FAILURES_ONLY = ("__request_region",)

MAX_ARGS = 6   # x86-64 passes six arguments in registers (PT_REGS_PARM1..6)


class Shape(namedtuple("Shape", [
        "function",
        "params",         # ((name, C type), ...) as BTF has them
        "roles",          # ((1-based position, role), ...)
        "returns",        # "int", "void", "pointer", "resource"
        "return_type",    # the C type BTF gives
        # the same types spelled to compile without the kernel's headers (Btf.plain_type_name):
        # what fentry programs are declared with
        "plain_params", "plain_return",
], defaults=("int", (), "int"))):
    __slots__ = ()

    def role_position(self, role) -> int | None:
        return next((pos for pos, r in self.roles if r == role), None)

    def describe(self):
        return f"{self.function}({c_arguments(self.params)}) -> {self.returns}"


def c_arguments(params):
    """A C argument list, `struct zone *zone, u64 start`, of (name, C type) pairs."""
    return ", ".join(f"{t}{'' if t.endswith('*') else ' '}{n}" for n, t in params)


def _return_kind(ctype):
    if ctype == "void":
        return "void"
    if ctype == "struct resource *":
        return "resource"
    if ctype.endswith("*"):
        return "pointer"
    return "int"


def shape_of(btf, function):
    """The Shape of one function, or None when BTF has no such function."""
    params = btf.func_params(function)
    if params is None:
        return None
    roles = tuple((i, ROLE_BY_PARAM[p]) for i, p in enumerate(params[:MAX_ARGS], 1)
                  if p in ROLE_BY_PARAM)
    ret = btf.func_return(function)
    return Shape(function, tuple(params), roles, _return_kind(ret), ret,
                 tuple(btf.func_params(function, plain=True)), btf.func_return(function, plain=True))


def shapes(btf, functions=ALL):
    """{function: Shape or None} for the watched functions."""
    return {fn: shape_of(btf, fn) for fn in functions}


class LayoutError(Exception):
    pass


# The struct fields the BPF program reads, by the offsets the running kernel's BTF gives.
# kernel-reference.md §3: they move between builds (dev_pagemap.type is at 96 in Debian 6.1 and
# 104 in 6.12), so a program compiled against another kernel's headers would read garbage.
ZONE_SPAN = ("zone_start_pfn", "spanned_pages", "present_pages")   # read in one go
MAX_SPAN_WORDS = 8
FIELDS_READ = {
    "zone": ZONE_SPAN + ("zone_pgdat",),
    "pglist_data": ("node_zones", "node_id"),
    "resource": ("start", "end", "name", "flags", "desc"),
    "range": ("start", "end"),
    "page": ("flags", "_refcount"),
}
SIZES_READ = ("zone", "range", "page")


# Struct layouts that change across kernels, and the kernel's enum values
Layouts = namedtuple("Layouts", [
    "offsets",            # (struct, member) -> byte offset
    "sizes",              # struct -> sizeof
    "pgmap_has_range",    # struct dev_pagemap: range/ranges (5.10+) or res (before)
    "params_has_pgmap",   # struct mhp_params.pgmap (5.17+)
    "memory_types",       # value -> MEMORY_DEVICE_* name
    "zone_names",         # zone index -> zoneinfo's name (Normal, Movable, ...)
    "page_flags",         # page->flags bit -> name as dump_page prints it (reserved, lru)
    "span",               # (offset, words) of struct zone that hold its span and present pages
])


# /proc/zoneinfo prints mm/page_alloc.c zone_names[], not the enum's spelling
_ZONEINFO_NAME = {"ZONE_DMA": "DMA", "ZONE_DMA32": "DMA32", "ZONE_NORMAL": "Normal",
                  "ZONE_HIGHMEM": "HighMem", "ZONE_MOVABLE": "Movable", "ZONE_DEVICE": "Device"}


def layouts(btf):
    """The running kernel's layouts; LayoutError names a struct or field its BTF lacks."""
    pgmap = btf.struct_offsets("dev_pagemap") or {}
    params = btf.struct_offsets("mhp_params") or {}
    wanted = dict(FIELDS_READ)
    wanted["dev_pagemap"] = ("type", "nr_range", "range") if "range" in pgmap else ("type", "res")
    if "pgmap" in params:
        wanted["mhp_params"] = ("pgmap",)
    offsets = {}
    for struct, members in wanted.items():
        have = btf.struct_offsets(struct)
        if have is None:
            raise LayoutError(f"struct {struct} is not in the kernel's BTF")
        for m in members:
            if m not in have:
                raise LayoutError(f"struct {struct} has no member {m} in the kernel's BTF")
            offsets[(struct, m)] = have[m]
    sizes = {s: btf.struct_size(s) for s in SIZES_READ}
    # read at once (two reads a call, not eight): a few words apart in every kernel since 4.x
    span = sorted(offsets[("zone", m)] for m in ZONE_SPAN)
    words = (span[-1] - span[0]) // 8 + 1
    if words > MAX_SPAN_WORDS or any(off % 8 for off in span):
        raise LayoutError(f"struct zone keeps {', '.join(ZONE_SPAN)} at {span}: not within "
                          f"{MAX_SPAN_WORDS} aligned words, as the probes read them")
    types = btf.enum_values("memory_type") or {}
    zones = btf.enum_values("zone_type") or {}
    return Layouts(offsets, sizes, "range" in pgmap, "pgmap" in params,
                   {v: k for k, v in types.items()},
                   {v: _ZONEINFO_NAME.get(k, k) for k, v in zones.items() if k in _ZONEINFO_NAME},
                   page_flag_names(btf.enum_values("pageflags") or {}), (span[0], words))


def page_flag_names(pageflags):
    """{bit: name} from enum pageflags: the first enumerator of each bit below __NR_PAGEFLAGS
    (later ones are aliases, PG_checked for PG_owner_priv_1), named as the kernel's %pGp prints
    it. The bits above hold the page's section, node and zone."""
    count = pageflags.get("__NR_PAGEFLAGS", 0)
    names = {}
    for name, bit in pageflags.items():
        if name.startswith("PG_") and bit < count:
            names.setdefault(bit, name.removeprefix("PG_"))
    return names
