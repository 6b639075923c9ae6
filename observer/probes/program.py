"""The BPF program text for the running kernel: bpf/memhp.c with its placeholders filled from
the probe shapes and struct layouts (both from BTF), plus the matching ctypes view of an event.
Pure text generation: nothing here loads or attaches anything."""

import ctypes
import os
import sys

from .shapes import FAILURES_ONLY, c_arguments

MAX_RANGES = 8    # a pgmap's ranges the event carries (drivers map one to a few)


def template_path():
    """bpf/memhp.c: beside observer/ in a checkout, under share/memhp-observer once installed."""
    here = os.path.join(os.path.dirname(__file__), "..", "..", "bpf", "memhp.c")
    installed = os.path.join(sys.prefix, "share", "memhp-observer", "bpf", "memhp.c")
    return here if os.path.exists(here) else installed

# One table for the C struct and its ctypes twin. u64s first, so neither side pads.
FIELDS = (
    ("seq", "u64"), ("ts_ns", "u64"), ("duration_ns", "u64"), ("ret", "s64"),
    ("start", "u64"), ("size", "u64"), ("start_pfn", "u64"), ("nr_pages", "u64"),
    ("zone_ptr", "u64"), ("span_start_before", "u64"), ("span_pages_before", "u64"),
    ("span_start_after", "u64"), ("span_pages_after", "u64"),
    ("present_before", "u64"), ("present_after", "u64"),
    ("pgmap_ptr", "u64"), ("pgmap_ranges", f"u64[{2 * MAX_RANGES}]"),
    ("res_start", "u64"), ("res_end", "u64"), ("res_flags", "u64"), ("res_desc", "u64"),
    # the page an annotation (dump_page) named during the call: its struct page address, the
    # vmemmap base then (pfn = distance in struct pages), its flags word
    ("blocker_page", "u64"), ("blocker_vmemmap", "u64"), ("blocker_flags", "u64"),
    ("fn", "u32"), ("pid", "u32"), ("tid", "u32"), ("nid", "s32"), ("zone_idx", "s32"),
    ("zone_nid", "s32"), ("pgmap_type", "u32"), ("pgmap_nr_range", "s32"), ("zone_device", "s32"),
    ("mhp_flags", "u32"),
    ("left_out", "u32"),   # a call the trace leaves out: emitted so its number is not awaited
    ("blockers", "u32"),   # pages named during the call (the first is kept)
    ("blocker_refcount", "s32"),
    ("stack_bytes", "s32"), ("comm", "char[16]"), ("res_name", "char[32]"),
    ("blocker_reason", "char[32]"),
    ("stack", "u64[32]"),   # last: entry zeroes the event up to it
)
_CTYPES = {"u64": ctypes.c_uint64, "s64": ctypes.c_int64, "u32": ctypes.c_uint32,
           "s32": ctypes.c_int32}


def _ctype(t):
    base, _, count = t.partition("[")
    ctype = ctypes.c_char if base == "char" else _CTYPES[base]
    return ctype * int(count[:-1]) if count else ctype


class Event(ctypes.Structure):
    _fields_ = [(name, _ctype(t)) for name, t in FIELDS]


def _c_field(name, t):
    base, bracket, count = t.partition("[")
    return f"    {base} {name}{bracket}{count};"


def _reads(shape, arg):
    """C that stores a function's arguments into `*e` at entry; arg(pos, name) spells one."""
    reads = []
    for pos, role in shape.roles:
        a = arg(pos, shape.params[pos - 1][0])
        reads.append({
            "nid": f"e->nid = (int){a};",
            "start": f"e->start = (u64){a};",
            "size": f"e->size = (u64){a};",
            "start_pfn": f"e->start_pfn = (u64){a};",
            "nr_pages": f"e->nr_pages = (u64){a};",
            "zone": f"e->zone_ptr = (u64){a}; read_zone(e);",
            "pgmap": f"e->pgmap_ptr = (u64){a};",
            "res": f"read_res(e, (u64){a});",
            "params": f"read_params(e, (u64){a});",
            "name": f"bpf_probe_read_kernel_str(&e->res_name, sizeof(e->res_name), (void *){a});",
            "mhp_flags": f"e->mhp_flags = (u32){a};",
        }[role])
    return reads


def _finish(shape, ret, ringbuf):
    """C that completes the in-flight event `e` at return and emits it."""
    lines = ["e->duration_ns = bpf_ktime_get_ns() - e->ts_ns;"]
    if ret:
        lines.append(f"e->ret = (s64){ret};")
    if shape.role_position("zone"):
        lines.append("read_span(e, 1);")
    if shape.role_position("pgmap") or shape.role_position("params"):
        lines.append("read_pgmap(e);")
    if shape.returns == "resource":   # a struct resource * that is neither NULL nor ERR_PTR
        lines.append("if (e->ret && (u64)e->ret < (u64)-4095) read_res(e, (u64)e->ret);")
    if shape.function in FAILURES_ONLY:
        lines.append("e->left_out = e->ret != 0;   // succeeded: only its number is wanted")
    lines.append("if (events.ringbuf_output(e, sizeof(*e), 0)) count_lost();" if ringbuf else
                 "if (events.perf_submit(ctx, e, sizeof(*e)) < 0) count_lost();")
    return lines


def _plain_args(shape):
    """fentry's argument list: BTF's names, the types spelled to compile without headers."""
    return c_arguments(shape.plain_params)


def _declarations(shapes):
    """`struct zone;` and the like: the structs fentry's arguments point at, declared ahead."""
    types = [t for s in shapes for _, t in s.plain_params] + [s.plain_return for s in shapes]
    names = sorted({t[:-2] for t in types if t.startswith(("struct ", "union ")) and
                    t.endswith(" *")})
    return "\n".join(f"{name};" for name in names)


def _probe_pair(index, shape, ringbuf, method):
    """C for one function's entry and return probes."""
    nl = "\n    "
    if method == "kprobe":
        enter = f"int enter_{index}(struct pt_regs *ctx)"
        leave = f"int leave_{index}(struct pt_regs *ctx)"
        reads = _reads(shape, lambda pos, name: f"PT_REGS_PARM{pos}(ctx)")
        ret = "PT_REGS_RC(ctx)" if shape.returns != "void" else None
    else:   # fentry/fexit: arguments by name and BTF type, the return value as the last one
        args = _plain_args(shape)
        enter = f"KFUNC_PROBE({shape.function}, {args})"
        ret_arg = "" if shape.returns == "void" else f", {shape.plain_return} ret"
        leave = f"KRETFUNC_PROBE({shape.function}, {args}{ret_arg})"
        reads = _reads(shape, lambda pos, name: name)
        ret = "ret" if shape.returns != "void" else None
    return f"""// {shape.describe()}
{enter} {{
    int zero = 0;
    struct event *e = scratch.lookup(&zero);
    if (!e)
        return 0;
    // all but the stack: bpf_get_stack fills it, and it is read only as far as stack_bytes says
    __builtin_memset(e, 0, __builtin_offsetof(struct event, stack));
    if (begin(ctx, e, {index})) {{
        count_lost();
        return 0;
    }}
    {nl.join(reads)}
    u64 key = ((u64){index} << 32) | e->tid;
    if (inflight.update(&key, e))
        count_lost();
    return 0;
}}

{leave} {{
    u64 key = ((u64){index} << 32) | (u32)bpf_get_current_pid_tgid();
    struct event *e = inflight.lookup(&key);
    if (!e)
        return 0;
    {nl.join(_finish(shape, ret, ringbuf))}
    inflight.delete(&key);
    count_up(2);   // a call returned: what it changed, the next read of the views reads whole
    return 0;
}}
"""


def _annotation_probe(index, shape, target, method):
    """C for an annotation's entry probe: what it names goes into the call `target` (an index)
    in flight on the same thread; outside such a call it does nothing."""
    page, reason = shape.role_position("page"), shape.role_position("reason")
    if method == "kprobe":
        enter = f"int enter_{index}(struct pt_regs *ctx)"
        page_arg, reason_arg = f"PT_REGS_PARM{page}(ctx)", f"PT_REGS_PARM{reason}(ctx)"
    else:
        enter = f"KFUNC_PROBE({shape.function}, {_plain_args(shape)})"
        page_arg, reason_arg = shape.params[page - 1][0], shape.params[reason - 1][0]
    return f"""// {shape.describe()}: annotates the call {target} in flight on this thread
{enter} {{
    u64 key = ((u64){target} << 32) | (u32)bpf_get_current_pid_tgid();
    struct event *e = inflight.lookup(&key);
    if (!e)
        return 0;
    if (e->blockers++ == 0)   // the first page named is the one that stopped the call
        read_blocker(e, (u64){page_arg}, (u64){reason_arg});
    return 0;
}}
"""


def _offsets(layouts):
    lines = [f"#define OFF_{struct}_{member} {off}"
             for (struct, member), off in sorted(layouts.offsets.items())]
    lines += [f"#define SIZEOF_{struct} {size}" for struct, size in sorted(layouts.sizes.items())]
    first, words = layouts.span
    lines += [f"#define SPAN_FIRST {first}", f"#define SPAN_WORDS {words}"]
    return "\n".join(lines)


_PGMAP_RANGES = f"""    int n = 0;
    read_at(&n, sizeof(n), pgmap, OFF(dev_pagemap, nr_range));
    e->pgmap_nr_range = n;
    for (int i = 0; i < {MAX_RANGES}; i++) {{
        if (i >= n)
            break;
        u64 range = pgmap + OFF(dev_pagemap, range) + i * SIZEOF_range;
        read_at(&e->pgmap_ranges[2 * i], 8, range, OFF(range, start));
        read_at(&e->pgmap_ranges[2 * i + 1], 8, range, OFF(range, end));
    }}"""

_PGMAP_RES = """    // before 5.10 a pgmap has one struct resource, not ranges
    e->pgmap_nr_range = 1;
    read_at(&e->pgmap_ranges[0], 8, pgmap, OFF(dev_pagemap, res) + OFF(resource, start));
    read_at(&e->pgmap_ranges[1], 8, pgmap, OFF(dev_pagemap, res) + OFF(resource, end));"""

_PARAMS_PGMAP = """    u64 pgmap = 0;
    read_at(&pgmap, sizeof(pgmap), plain(ptr), OFF(mhp_params, pgmap));
    e->zone_device = pgmap != 0;   // only memremap_pages passes a pgmap
    e->pgmap_ptr = pgmap;"""

_NO_PARAMS_PGMAP = """    // mhp_params has no pgmap before 5.17: unknown here, ZONE_DEVICE shows in memremap_pages
    e->zone_device = -1;"""


# The call number: one atomic fetch-and-add where the verifier takes it (5.12+); before that, a
# one-entry hash map inserted with BPF_NOEXIST is the lock around the counter (kprobe programs
# may not hold a bpf_spin_lock there). The holder keeps it for a load and a store, so a few
# tries suffice; a call that gets no number is counted lost.
_SEQ_ATOMIC = """static __always_inline int take_seq(u64 *counter, u64 *seq) {
    *seq = __sync_fetch_and_add(counter, 1);
    return 0;
}"""
_SEQ_LOCKED = """BPF_HASH(seq_lock, u32, u32, 1);
static __always_inline int take_seq(u64 *counter, u64 *seq) {
    u32 k = 0, held = 1;
    for (int i = 0; i < 64; i++) {
        if (seq_lock.insert(&k, &held) == 0) {
            *seq = *counter;
            *counter = *seq + 1;
            seq_lock.delete(&k);
            return 0;
        }
    }
    return -1;
}"""


def build(shapes, layouts, ringbuf=True, method="kprobe", template=None, annotations=None,
          atomic_fetch=True):
    """C text for the given {index: Shape}; indexes are the `fn` values events carry.
    annotations: {index: target index} of the shapes that annotate another call (entry probe
    only).
    method: "kprobe" (enter_N/leave_N, attached by name) or "kfunc" (fentry/fexit, attached by
    bcc when the program loads). atomic_fetch: whether the verifier takes an atomic
    fetch-and-add (availability.has_atomic_fetch)."""
    annotations = annotations or {}
    with open(template or template_path()) as f:
        text = f.read()
    # 2 MiB, about 2,900 events (one is 704 bytes, its stack most of it): a burst of a few
    # hundred operations while the daemon's Python is busy (under TCG, a lab guest cycling a
    # block: 256 KiB lost 1,238 events in 200 cycles)
    output = ("BPF_RINGBUF_OUTPUT(events, 512);  // one order for all CPUs" if ringbuf else
              "BPF_PERF_OUTPUT(events);  // per CPU: Python restores call order by seq")
    replacements = {
        "@METHOD@": "" if method == "kprobe" else "#define FENTRY",
        "@DECLARATIONS@": "" if method == "kprobe" else _declarations(shapes.values()),
        "@EVENT_FIELDS@": "\n".join(_c_field(n, t) for n, t in FIELDS),
        "@OFFSETS@": _offsets(layouts),
        "@OUTPUT_DECL@": output,
        "@PGMAP_RANGES@": _PGMAP_RANGES if layouts.pgmap_has_range else _PGMAP_RES,
        "@PARAMS_PGMAP@": _PARAMS_PGMAP if layouts.params_has_pgmap else _NO_PARAMS_PGMAP,
        "@TAKE_SEQ@": _SEQ_ATOMIC if atomic_fetch else _SEQ_LOCKED,
        "@PROBES@": "\n".join(_annotation_probe(i, s, annotations[i], method) if i in annotations
                              else _probe_pair(i, s, ringbuf, method)
                              for i, s in sorted(shapes.items())),
    }
    for key, value in replacements.items():
        text = text.replace(key, value)
    return text
