"""Replay throughput and its scaling. A synthetic BPF-mode trace is generated from a valid
operation sequence: this project's host capture grown to N memory blocks (the added ones online
in Movable), then offline and online of blocks inside Movable, one after another, as Debian
6.1's probes record a write to memoryN/state (lab-6.1's trace): an offline is offline_pages and
the remove_pfn_range_from_zone it calls, an online is online_pages and its
move_pfn_range_to_zone (each with the zone's span and present pages before and after), each
followed by its uevent; and a read of the views (a snapshot record) every 1,000 events. replay
must judge every read and find nothing above info. `replay` of the file (read, parse and model)
is timed against a raw JSON parse of the same file by Python's json module, in one run (and
beside it orjson's parse alone, the parser replay uses), each the fastest of three rounds that
time the three in turn: for 10^4..10^6 events on a host of
10^3 blocks, and for 10^5 events on hosts of 10^3..10^6 blocks. Budget (DESIGN.md §7): ≥ 200,000
events/s, ≥ 0.5× the raw parse, and the cost per event flat across host sizes (here: the largest
host's no more than 1.25× the smallest's)."""

import json
import os
import time

import orjson

from observer import formats, snapshot
from observer.pipeline import replay

from .trees import HOST

MIN_EVENTS_PER_SECOND = 200_000
MIN_PARSE_RATIO = 0.5
MAX_COST_GROWTH = 1.25
SNAPSHOT_EVERY = 1000                 # events between reads of the views
ROUNDS = 3
TEMPLATES = os.path.join(os.path.dirname(HOST), "lab-6.1", "trace.jsonl")   # header, events
PAGE, BLOCK = 4096, 128 << 20
PER_BLOCK = BLOCK // PAGE
# a sysfs offline and online as 6.1's probes record them: the outer call, and the zone's
# change it makes inside
CALLS = {"offline": ("offline_pages", "remove_pfn_range_from_zone"),
         "online": ("online_pages", "move_pfn_range_to_zone")}


def generate(path, events, blocks):
    """Write the trace; (events written, snapshots written)."""
    with open(TEMPLATES) as f:
        records = [json.loads(line) for line in f]
    header = dict(records[0], start_monotonic_ns=10**9)
    # a write to memoryN/state calls the outer function, which calls the inner
    callers = {fn: caller for outer, inner in CALLS.values()
               for fn, caller in ((outer, "memory_subsys_"), (inner, outer + " "))}
    template = {fn: next(r for r in records if r.get("fn") == fn and r.get("ret") in (0, None)
                         and r["caller"].startswith(caller))
                for fn, caller in callers.items()}
    view = formats.snapshot_record(snapshot.take(HOST), 0, 0, 0)
    first = max(r["last_block"] for r in view["memory_blocks"]) + 1
    movable = blocks - sum(r["last_block"] - r["first_block"] + 1 for r in view["memory_blocks"])
    if movable < 3:
        raise ValueError(f"a host of {blocks} blocks is smaller than the capture it grows")
    start, present = first * PER_BLOCK, movable * PER_BLOCK
    view["memory_blocks"].append({"start": first * BLOCK, "end": (first + movable) * BLOCK - 1,
                                  "size": movable * BLOCK, "state": "online", "zone": "Movable",
                                  "node": 0, "first_block": first, "last_block": first + movable - 1})
    for z in view["zones"]:
        if z["zone"] == "Movable":
            z.update(start_pfn=start, end_pfn=start + present, spanned_pages=present,
                     present_pages=present, managed_pages=present)
    # the grown RAM goes past the PCI windows the capture had up there: they go, as in trees.py
    view["iomem"] = [r for r in view["iomem"] if r[0] < first * BLOCK] + \
        [[first * BLOCK, (first + movable) * BLOCK - 1, 0, "System RAM"]]
    span = {"start_pfn": start, "spanned": present}
    ts, seq, snapshots = 2 * 10**9, 0, 0
    with open(path, "w") as f:
        def write(rec):
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")

        def read_views():
            nonlocal ts, snapshots
            write(dict(view, ts_ns=ts + 10**6, read_start_ns=ts, calls_before=seq))
            ts, snapshots = ts + 2 * 10**6, snapshots + 1
        write(header)
        read_views()
        for i in range(events // 2):
            block = first + 1 + i // 2 % (movable - 2)      # never an edge: the span stays
            action = "offline" if i % 2 == 0 else "online"
            outer, inner = CALLS[action]
            fewer, more = dict(span, present=present - PER_BLOCK), dict(span, present=present)
            pfns = {"start_pfn": block * PER_BLOCK, "nr_pages": PER_BLOCK}
            # the zone's present pages move in the outer call, around the inner one (after
            # remove_pfn_range_from_zone, before move_pfn_range_to_zone): the inner sees fewer
            spans = ((more, fewer) if action == "offline" else (fewer, more), (fewer, fewer))
            for k, (fn, (before, after)) in enumerate(zip((outer, inner), spans)):
                write(dict(template[fn], seq=seq + k, ts_ns=ts + k * 10**4,
                           duration_ns=10**5 // (1 + 9 * k), **pfns,
                           span_before=before, span_after=after))
            write({"type": "uevent", "action": action, "block": block, "seqnum": seq,
                   "ts_ns": ts + 2 * 10**5})
            seq, ts = seq + 2, ts + 10**6
            if seq % SNAPSHOT_EVERY == 0:
                ts += 2 * 10**9   # the views read a while after: settled
                read_views()
    return events // 2 * 2, snapshots


def parse_seconds(path, loads):
    t = time.perf_counter()
    with open(path, "rb") as f:
        for line in f:
            loads(line)
    return time.perf_counter() - t


def measure(path, events, snapshots, rounds):
    """(replay, Python's json parse, orjson's parse) events/s of one trace: the fastest of
    `rounds` rounds, each timing the three in turn (this machine's speed drifts by half within
    minutes; the fastest run of each is the one least slowed by it)."""
    best = [float("inf")] * 3
    for _ in range(rounds):
        t = time.perf_counter()
        found, model = replay(path)
        seconds = (time.perf_counter() - t, parse_seconds(path, json.loads),
                   parse_seconds(path, orjson.loads))
        best = [min(b, s) for b, s in zip(best, seconds)]
        said = [a.message for a in found if a.severity != "info"]
        if said or model.snapshots["judged"] != snapshots:
            raise RuntimeError(f"{path}: the synthetic trace is not a healthy one: {said[:3]} "
                               f"{model.snapshots} of {snapshots} reads ({model.last_unsettled})")
    return tuple(events / s for s in best)


def runs(quick):
    """(events, blocks) pairs: events grow on the smallest host, then hosts grow."""
    if quick:
        return [(2000, 1000)]
    return [(10**4, 10**3), (10**5, 10**3), (10**6, 10**3),
            (10**5, 10**4), (10**5, 10**5), (10**5, 10**6)]


def rows(quick, workdir, progress, plot=None):
    """The report's rows; plot: a PNG path for the scaling figure, or None."""
    results = []
    for events, blocks in runs(quick):
        where = f"{events:,} events, {blocks:,} blocks"
        progress(f"replay: generating {where}")
        path = os.path.join(workdir, f"trace-{events}-{blocks}.jsonl")
        written = generate(path, events, blocks)
        progress(f"replay: timing {where}")
        results.append((events, blocks, *measure(path, *written, 1 if quick else ROUNDS)))
        os.unlink(path)   # generated here, nobody else's
    out = []
    for events, blocks, rate, parse, fast_parse in results:
        out.append({"benchmark": "replay throughput", "where": f"{events:,} events, "
                    f"{blocks:,} blocks", "measured": f"{rate:,.0f} events/s (orjson's parse "
                                                      f"alone {fast_parse:,.0f})",
                    "reference": f"raw JSON parse {parse:,.0f} events/s", "ratio": rate / parse,
                    "budget": f"≥ {MIN_EVENTS_PER_SECOND:,} events/s, ≥ {MIN_PARSE_RATIO}×",
                    "within": rate >= MIN_EVENTS_PER_SECOND and rate / parse >= MIN_PARSE_RATIO})
    by_host = sorted((blocks, rate) for events, blocks, rate, _, _ in results
                     if events == results[-1][0])
    if len(by_host) > 1:
        (small, fast), (large, slow) = by_host[0], by_host[-1]
        growth = fast / slow
        out.append({"benchmark": "replay cost per event across hosts", "where":
                    f"{small:,} → {large:,} blocks", "measured": f"{1e6 / slow:.2f} µs/event",
                    "reference": f"{1e6 / fast:.2f} µs/event at {small:,} blocks",
                    "ratio": growth, "budget": f"≤ {MAX_COST_GROWTH}×",
                    "within": growth <= MAX_COST_GROWTH})
    if plot:
        _plot(results, plot)
    return out


def _plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (by_events, by_blocks) = plt.subplots(1, 2, figsize=(10, 4))
    smallest = min(b for _, b, _, _, _ in results)
    for ax, points, label in (
            (by_events, [(e, r, p) for e, b, r, p, _ in results if b == smallest],
             f"trace events (host of {smallest:,} blocks)"),
            (by_blocks, [(b, r, p) for e, b, r, p, _ in results if e == results[-1][0]],
             f"host memory blocks ({results[-1][0]:,} events)")):
        points.sort()
        ax.plot([x for x, _, _ in points], [r for _, r, _ in points], "o-", label="replay")
        ax.plot([x for x, _, _ in points], [p for _, _, p in points], "s--",
                label="raw JSON parse (Python's json)")
        ax.axhline(MIN_EVENTS_PER_SECOND, color="red", linestyle=":", label="budget")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("events/s")
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
