"""Reconcile and /metrics scrape against node_exporter. One reconcile is what the daemon does
each interval: the views read, the snapshot judged by the model. The daemon reads again only
the memory blocks that uevents named (every block at its first read, every 10 minutes, and
after the kernel dropped uevents), so three are timed: with no uevent since the last, after one
block's uevent (handed to the source, 2 s before: the settled read the daemon takes after
one), and a read of every block. One scrape is a GET of the daemon's /metrics. The reference
is a GET of /metrics from Debian's prometheus-node-exporter with only its zoneinfo collector,
reading the same tree. All are taken in turn (five scrapes of each server a round), round
after round, once both servers are idle (the daemon reads the views a second time after it
begins serving), in one run: on this host's own views, and on the host capture grown to
10^3..10^5 memory blocks (bench/trees.py). Budget (DESIGN.md §7): a reconcile (no uevent, or one) and a scrape each ≤ 1.0× the reference, at every
size; the read of every block is reported beside them."""

import os
import shutil
import statistics
import time
import urllib.request

from observer.model.model import Model
from observer.sources.live import LiveSource
from observer.uevents import HandedUevents

from .processes import EXE, Server, free_port, until_idle

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
BUDGET = 1.0   # × the reference
SCRAPES = 5    # of each server a round, in turn: a scrape is quick, and its median noisy


KINDS = {"reconcile": "reconcile, no uevent since the last",
         "reconcile_uevent": "reconcile after one block's uevent",
         "full": "read of every block (at start, every 10 min)",
         "scrape": "scrape"}
JUDGED = ("reconcile", "reconcile_uevent", "scrape")   # the budget is theirs


def measure(root, rounds, progress):
    """{kind of KINDS, "node_exporter": median seconds} on the views under root."""
    uevents = HandedUevents()
    source = LiveSource(root=root, uevents=uevents)
    lost = HandedUevents()           # uevents "dropped" before each read: every block read
    whole = LiveSource(root=root, uevents=lost)
    model = Model()
    model.feed(source.header(source.read_views()))
    for rec in source.poll(0):
        model.feed(rec)
    time.sleep(1.1)   # a read in the model's first second is never judged: it would cost less
    block = source.read_views().blocks.blocks[0].index
    for rec in source.poll(0):
        model.feed(rec)
    paths = [] if root == "/" else [f"--path.procfs={root}/proc", f"--path.sysfs={root}/sys"]
    ne_port, our_port = free_port(), free_port()
    with Server([NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{ne_port}",
                 "--collector.disable-defaults", "--collector.zoneinfo", *paths], ne_port) as ne, \
            Server([EXE, "run", "--mode", "procfs", "--root", root, "--reconcile-interval", "86400",
                    "--listen", f"127.0.0.1:{our_port}"], our_port) as ours:
        # what the daemon does after it began serving, a second read of the views, is not
        # what is measured
        until_idle(ours.proc.pid)
        until_idle(ne.proc.pid)
        times = {name: [] for name in list(KINDS) + ["node_exporter"]}
        judged = model.snapshots["judged"]
        for i in range(rounds):
            progress(f"round {i + 1}/{rounds}")
            for kind, src in (("reconcile", source), ("reconcile_uevent", source), ("full", whole)):
                if kind == "reconcile_uevent":
                    uevents.hand("online", block, time.monotonic_ns() - 2 * 10 ** 9)
                lost.overflowed = True
                t = time.perf_counter()
                src.read_views()
                for rec in src.poll(0):
                    model.feed(rec)
                times[kind].append(time.perf_counter() - t)
            for _ in range(SCRAPES):
                for name, port in (("scrape", our_port), ("node_exporter", ne_port)):
                    t = time.perf_counter()
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                timeout=60) as r:
                        r.read()
                    times[name].append(time.perf_counter() - t)
    source.close()
    whole.close()
    if model.snapshots["judged"] - judged != 3 * rounds:
        raise RuntimeError(f"{root}: the model judged {model.snapshots['judged'] - judged} of "
                           f"{3 * rounds} reads ({model.last_unsettled}): not a reconcile's full cost")
    return {name: statistics.median(t) for name, t in times.items()}


def rows(sizes, rounds, workdir, progress):
    """The report's rows: on this host, then on a generated tree of each size."""
    from .trees import host_with_blocks
    out = []
    for where, size in [("this host", None)] + [(f"{n:,} blocks", n) for n in sizes]:
        if size is None:
            root = "/"
        else:
            progress(f"growing the host capture to {size:,} memory blocks")
            root = host_with_blocks(os.path.join(workdir, f"tree-{size}"), size)
        n = rounds if (size or 0) < 100_000 else max(3, rounds // 3)   # seconds a round there
        medians = measure(root, n, lambda s: progress(f"reconcile/scrape, {where}: {s}"))
        ref = medians["node_exporter"]
        for name, said in KINDS.items():
            ratio = medians[name] / ref
            samples = n * SCRAPES if name == "scrape" else n
            out.append({"benchmark": f"{said} (median of {samples})", "where": where,
                        "measured": f"{medians[name] * 1e3:.2f} ms",
                        "reference": f"node_exporter zoneinfo scrape {ref * 1e3:.2f} ms",
                        "ratio": ratio, "budget": f"≤ {BUDGET:.1f}×" if name in JUDGED else "—",
                        "within": ratio <= BUDGET if name in JUDGED else None})
        if size is not None:
            shutil.rmtree(root)   # generated here, nobody else's
    return out
