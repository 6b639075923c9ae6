// memhp-observer probes (bcc C). observer/probes/program.py fills the @PLACEHOLDERS@ from the
// running kernel's BTF: the event layout, the output (ring buffer or perf buffer), and one
// entry/return pair per watched function: kprobe/kretprobe reading arguments by position, or
// fentry/fexit (KFUNC_PROBE/KRETFUNC_PROBE) naming them as BTF types them.
#include <uapi/linux/ptrace.h>
#include <linux/mmzone.h>
#include <linux/ioport.h>
#include <linux/memremap.h>
#include <linux/memory_hotplug.h>

struct event {
@EVENT_FIELDS@
};

// A call in flight, per (function, thread): entry fills it, return completes and emits it, so
// one call is one event.
BPF_HASH(inflight, u64, struct event, 4096);
// [0] call sequence (entry order across CPUs: the order Python releases events in),
// [1] events the output could not take
BPF_ARRAY(counters, u64, 2);
// Where entry builds its event: one per CPU, since the event is larger than a BPF stack can hold.
BPF_PERCPU_ARRAY(scratch, struct event, 1);
@OUTPUT_DECL@

static __always_inline void count_lost(void) {
    int k = 1;
    u64 *v = counters.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline void begin(void *ctx, struct event *e, u32 fn) {
    int k = 0;
    u64 *seq = counters.lookup(&k);
    u64 id = bpf_get_current_pid_tgid();
    e->fn = fn;
    e->seq = seq ? __sync_fetch_and_add(seq, 1) : 0;
    e->ts_ns = bpf_ktime_get_ns();
    e->pid = id >> 32;
    e->tid = (u32)id;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    // the kernel stack at entry, innermost first: who asked (the origin) is in it
    e->stack_bytes = bpf_get_stack(ctx, e->stack, sizeof(e->stack), 0);
}

static __always_inline void read_zone(struct event *e, int after) {
    struct zone *z = (struct zone *)e->zone_ptr;
    struct pglist_data *pg = 0;
    u64 start = 0, spanned = 0, addr = 0;
    bpf_probe_read_kernel(&pg, sizeof(pg), &z->zone_pgdat);
    bpf_probe_read_kernel(&start, sizeof(start), &z->zone_start_pfn);
    bpf_probe_read_kernel(&spanned, sizeof(spanned), &z->spanned_pages);
    // the zone's index is its place in pgdat->node_zones[]. Under fentry the verifier types the
    // argument as a zone pointer and refuses arithmetic on it: work on a plain copy of the address.
    bpf_probe_read_kernel(&addr, sizeof(addr), &e->zone_ptr);
    e->zone_idx = (addr - ((u64)pg + offsetof(struct pglist_data, node_zones))) / sizeof(struct zone);
    bpf_probe_read_kernel(&e->zone_nid, sizeof(e->zone_nid), &pg->node_id);
    if (after) {
        e->span_start_after = start;
        e->span_pages_after = spanned;
    } else {
        e->span_start_before = start;
        e->span_pages_before = spanned;
    }
}

static __always_inline void read_pgmap(struct event *e, u64 ptr) {
    struct dev_pagemap *pgmap = (struct dev_pagemap *)ptr;
    e->pgmap_ptr = ptr;
    bpf_probe_read_kernel(&e->pgmap_type, sizeof(e->pgmap_type), &pgmap->type);
@PGMAP_RANGE@
}

static __always_inline void read_res(struct event *e, u64 ptr) {
    struct resource *res = (struct resource *)ptr;
    const char *name = 0;
    bpf_probe_read_kernel(&e->res_start, sizeof(e->res_start), &res->start);
    bpf_probe_read_kernel(&e->res_end, sizeof(e->res_end), &res->end);
    bpf_probe_read_kernel(&e->res_flags, sizeof(e->res_flags), &res->flags);
    bpf_probe_read_kernel(&name, sizeof(name), &res->name);
    bpf_probe_read_kernel_str(&e->res_name, sizeof(e->res_name), name);
}

static __always_inline void read_params(struct event *e, u64 ptr) {
@PARAMS_PGMAP@
}

@PROBES@
