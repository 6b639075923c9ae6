"""The BPF program text for the running kernel: bpf/memhp.c with its placeholders filled from
the probe shapes and struct layouts (both from BTF), plus the matching ctypes view of an event.
Pure text generation: nothing here loads or attaches anything."""

import ctypes
import os

TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "..", "bpf", "memhp.c")

# One table for the C struct and its ctypes twin. u64s first, so neither side pads.
FIELDS = (
    ("seq", "u64"), ("ts_ns", "u64"), ("duration_ns", "u64"), ("ret", "s64"),
    ("start", "u64"), ("size", "u64"), ("start_pfn", "u64"), ("nr_pages", "u64"),
    ("zone_ptr", "u64"), ("span_start_before", "u64"), ("span_pages_before", "u64"),
    ("span_start_after", "u64"), ("span_pages_after", "u64"),
    ("pgmap_ptr", "u64"), ("pgmap_start", "u64"), ("pgmap_end", "u64"),
    ("res_start", "u64"), ("res_end", "u64"), ("res_flags", "u64"),
    ("fn", "u32"), ("pid", "u32"), ("tid", "u32"), ("nid", "s32"), ("zone_idx", "s32"),
    ("zone_nid", "s32"), ("pgmap_type", "u32"), ("pgmap_nr_range", "s32"), ("zone_device", "u32"),
    ("stack_bytes", "s32"), ("comm", "char[16]"), ("res_name", "char[32]"),
    ("stack", "u64[32]"),
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
            "zone": f"e->zone_ptr = (u64){a}; read_zone(e, 0);",
            "pgmap": f"read_pgmap(e, (u64){a});",
            "res": f"read_res(e, (u64){a});",
            "params": f"read_params(e, (u64){a});",
            "name": f"bpf_probe_read_kernel_str(&e->res_name, sizeof(e->res_name), (void *){a});",
        }[role])
    return reads


def _finish(shape, ret, ringbuf):
    """C that completes the in-flight event `e` at return and emits it."""
    lines = ["e->duration_ns = bpf_ktime_get_ns() - e->ts_ns;"]
    if ret:
        lines.append(f"e->ret = (s64){ret};")
    if shape.role_position("zone"):
        lines.append("read_zone(e, 1);")
    if shape.returns == "resource":   # a struct resource * that is neither NULL nor ERR_PTR
        lines.append("if (e->ret && (u64)e->ret < (u64)-4095) read_res(e, (u64)e->ret);")
    lines.append("if (events.ringbuf_output(e, sizeof(*e), 0)) count_lost();" if ringbuf else
                 "if (events.perf_submit(ctx, e, sizeof(*e)) < 0) count_lost();")
    return lines


def _probe_pair(index, shape, ringbuf, method):
    """C for one function's entry and return probes."""
    nl = "\n    "
    if method == "kprobe":
        enter = f"int enter_{index}(struct pt_regs *ctx)"
        leave = f"int leave_{index}(struct pt_regs *ctx)"
        reads = _reads(shape, lambda pos, name: f"PT_REGS_PARM{pos}(ctx)")
        ret = "PT_REGS_RC(ctx)" if shape.returns != "void" else None
    else:   # fentry/fexit: arguments by name and BTF type, the return value as the last one
        args = ", ".join(f"{t}{'' if t.endswith('*') else ' '}{n}" for n, t in shape.params)
        enter = f"KFUNC_PROBE({shape.function}, {args})"
        ret_arg = "" if shape.returns == "void" else f", {shape.return_type} ret"
        leave = f"KRETFUNC_PROBE({shape.function}, {args}{ret_arg})"
        reads = _reads(shape, lambda pos, name: name)
        ret = "ret" if shape.returns != "void" else None
    return f"""// {shape.describe()}
{enter} {{
    int zero = 0;
    struct event *e = scratch.lookup(&zero);
    if (!e)
        return 0;
    __builtin_memset(e, 0, sizeof(*e));
    begin(ctx, e, {index});
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
    return 0;
}}
"""


def build(shapes, layouts, ringbuf=True, method="kprobe", template=TEMPLATE):
    """C text for the given {index: Shape}; indexes are the `fn` values events carry.
    method: "kprobe" (enter_N/leave_N, attached by name) or "kfunc" (fentry/fexit, attached by
    bcc when the program loads)."""
    with open(template) as f:
        text = f.read()
    pgmap_range = ("    bpf_probe_read_kernel(&e->pgmap_nr_range, sizeof(e->pgmap_nr_range), &pgmap->nr_range);\n"
                   "    bpf_probe_read_kernel(&e->pgmap_start, sizeof(e->pgmap_start), &pgmap->range.start);\n"
                   "    bpf_probe_read_kernel(&e->pgmap_end, sizeof(e->pgmap_end), &pgmap->range.end);"
                   if layouts.pgmap_has_range else
                   "    e->pgmap_nr_range = 1;  // before 5.10: one struct resource res\n"
                   "    bpf_probe_read_kernel(&e->pgmap_start, sizeof(e->pgmap_start), &pgmap->res.start);\n"
                   "    bpf_probe_read_kernel(&e->pgmap_end, sizeof(e->pgmap_end), &pgmap->res.end);")
    params_pgmap = ("    struct mhp_params *p = (struct mhp_params *)ptr;\n"
                    "    u64 pgmap = 0;\n"
                    "    bpf_probe_read_kernel(&pgmap, sizeof(pgmap), &p->pgmap);\n"
                    "    e->zone_device = pgmap != 0;\n"
                    "    if (pgmap)\n"
                    "        read_pgmap(e, pgmap);"
                    if layouts.params_has_pgmap else
                    "    // mhp_params has no pgmap before 5.17: ZONE_DEVICE shows in memremap_pages")
    output = ("BPF_RINGBUF_OUTPUT(events, 64);  // one order for all CPUs" if ringbuf else
              "BPF_PERF_OUTPUT(events);  // per CPU: Python restores call order by seq")
    replacements = {
        "@EVENT_FIELDS@": "\n".join(_c_field(n, t) for n, t in FIELDS),
        "@OUTPUT_DECL@": output,
        "@PGMAP_RANGE@": pgmap_range,
        "@PARAMS_PGMAP@": params_pgmap,
        "@PROBES@": "\n".join(_probe_pair(i, s, ringbuf, method) for i, s in sorted(shapes.items())),
    }
    for key, value in replacements.items():
        text = text.replace(key, value)
    return text
