// memhp-observer probes (bcc C). observer/probes/program.py fills the @PLACEHOLDERS@ from the
// running kernel's BTF: the event layout, the struct offsets every field is read at, the output
// (ring buffer or perf buffer), and one entry/return pair per watched function: kprobe/kretprobe
// reading arguments by position, or fentry/fexit (KFUNC_PROBE/KRETFUNC_PROBE) naming them as BTF
// types them, spelled to need no kernel header: no field is read through a struct definition,
// which could come from another kernel build (a host whose kernel has no headers package of its
// own links Debian's, and zone_start_pfn sits at 128 in 6.1, 144 in 6.12), and bcc compiles in
// half the time without mmzone.h and its kin. The structs fentry's arguments point at are
// declared below.
#include <uapi/linux/ptrace.h>
@METHOD@
@DECLARATIONS@

struct event {
@EVENT_FIELDS@
};

// Byte offsets of the fields read below, from the running kernel's BTF: OFF(zone, spanned_pages).
@OFFSETS@
#define OFF(type, member) OFF_##type##_##member

// A call in flight, per (function, thread): entry fills it, return completes and emits it, so
// one call is one event.
BPF_HASH(inflight, u64, struct event, 4096);
// [0] call sequence (entry order across CPUs: the order Python releases events in),
// [1] events the output could not take, [2] calls returned; mapped into Python's memory, which
// reads them there
BPF_F_TABLE("array", int, u64, counters, 3, BPF_F_MMAPABLE);
// Where entry builds its event: one per CPU, since the event is larger than a BPF stack can hold.
BPF_PERCPU_ARRAY(scratch, struct event, 1);
@OUTPUT_DECL@

static __always_inline void count_up(int k) {
    u64 *v = counters.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline void count_lost(void) {
    count_up(1);
}

// Read `size` bytes at kernel address `base + offset`. Under fentry the verifier types arguments
// by BTF and refuses arithmetic on them, so addresses travel as plain u64 values.
static __always_inline void read_at(void *dst, u32 size, u64 base, u32 offset) {
    bpf_probe_read_kernel(dst, size, (void *)(base + offset));
}

// An address as a number to add to. A kprobe's arguments are numbers already; under fentry the
// compiler may hand on the BTF-typed argument itself where the event's copy was stored, so it
// goes through a read.
static __always_inline u64 plain(u64 addr) {
#ifdef FENTRY
    u64 copy = 0;
    bpf_probe_read_kernel(&copy, sizeof(copy), &addr);
    return copy;
#else
    return addr;
#endif
}

@TAKE_SEQ@

// Fills the entry half of an event; nonzero when no call number could be taken (the call is
// then left out and counted lost).
static __always_inline int begin(void *ctx, struct event *e, u32 fn) {
    int k = 0;
    u64 *seq = counters.lookup(&k);
    u64 id = bpf_get_current_pid_tgid();
    if (!seq || take_seq(seq, &e->seq))
        return -1;
    e->fn = fn;
    e->ts_ns = bpf_ktime_get_ns();
    e->pid = id >> 32;
    e->tid = (u32)id;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    // the kernel stack at entry, innermost first: who asked (the origin) is in it
    e->stack_bytes = bpf_get_stack(ctx, e->stack, sizeof(e->stack), 0);
    return 0;
}

// A zone's span and present pages, in one read: the kernel keeps zone_start_pfn, spanned_pages
// and present_pages within SPAN_WORDS words from SPAN_FIRST (shapes.py checks, from BTF).
static __always_inline void read_span(struct event *e, int after) {
    u64 words[SPAN_WORDS] = {};
    read_at(words, sizeof(words), plain(e->zone_ptr), SPAN_FIRST);
    u64 start = words[(OFF(zone, zone_start_pfn) - SPAN_FIRST) / 8];
    u64 spanned = words[(OFF(zone, spanned_pages) - SPAN_FIRST) / 8];
    u64 present = words[(OFF(zone, present_pages) - SPAN_FIRST) / 8];
    if (after) {
        e->span_start_after = start;
        e->span_pages_after = spanned;
        e->present_after = present;
    } else {
        e->span_start_before = start;
        e->span_pages_before = spanned;
        e->present_before = present;
    }
}

// At entry: the zone's node and index (its place in pgdat->node_zones[]), and its span before.
static __always_inline void read_zone(struct event *e) {
    u64 zone = plain(e->zone_ptr), pgdat = 0;
    read_at(&pgdat, sizeof(pgdat), zone, OFF(zone, zone_pgdat));
    e->zone_idx = (zone - (pgdat + OFF(pglist_data, node_zones))) / SIZEOF_zone;
    read_at(&e->zone_nid, sizeof(e->zone_nid), pgdat, OFF(pglist_data, node_id));
    read_span(e, 0);
}

// A pgmap is read at return: memremap_pages() zeroes nr_range and counts the ranges it maps, so
// at entry the count is not yet the truth (kernel-reference.md §3.1).
static __always_inline void read_pgmap(struct event *e) {
    u64 pgmap = plain(e->pgmap_ptr);
    if (!pgmap)
        return;
    read_at(&e->pgmap_type, sizeof(e->pgmap_type), pgmap, OFF(dev_pagemap, type));
@PGMAP_RANGES@
}

static __always_inline void read_res(struct event *e, u64 ptr) {
    u64 res = plain(ptr), name = 0;
    read_at(&e->res_start, sizeof(e->res_start), res, OFF(resource, start));
    read_at(&e->res_end, sizeof(e->res_end), res, OFF(resource, end));
    read_at(&e->res_flags, sizeof(e->res_flags), res, OFF(resource, flags));
    read_at(&e->res_desc, sizeof(e->res_desc), res, OFF(resource, desc));
    read_at(&name, sizeof(name), res, OFF(resource, name));
    bpf_probe_read_kernel_str(&e->res_name, sizeof(e->res_name), (void *)name);
}

// [0]: where the kernel keeps vmemmap's base (randomized per boot), from kallsyms; 0 when
// unknown. A map, not a constant, so that the compiled program outlives a boot (image.py).
BPF_ARRAY(kernel_addresses, u64, 1);

// The page an annotation names: its address, the vmemmap base (Python makes the pfn of the two),
// its flags and refcount, and the kernel's reason, as dump_page() would print them.
static __always_inline void read_blocker(struct event *e, u64 page, u64 reason) {
    int k = 0;
    u64 *vmemmap_base = kernel_addresses.lookup(&k);
    e->blocker_page = plain(page);
    if (vmemmap_base && *vmemmap_base)
        read_at(&e->blocker_vmemmap, sizeof(e->blocker_vmemmap), *vmemmap_base, 0);
    read_at(&e->blocker_flags, sizeof(e->blocker_flags), page, OFF(page, flags));
    read_at(&e->blocker_refcount, sizeof(e->blocker_refcount), page, OFF(page, _refcount));
    bpf_probe_read_kernel_str(&e->blocker_reason, sizeof(e->blocker_reason), (void *)plain(reason));
}

static __always_inline void read_params(struct event *e, u64 ptr) {
@PARAMS_PGMAP@
}

@PROBES@
