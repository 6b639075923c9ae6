"""Reconcile and /metrics scrape against node_exporter. One reconcile is what the daemon does
each interval: every view read, the snapshot judged by the model. One scrape is a GET of the
daemon's /metrics. The reference is a GET of /metrics from Debian's prometheus-node-exporter
with only its zoneinfo collector, reading the same tree. The three are taken in turn, round after
round, in one run: on this host's own views, and on the host capture grown to 10^3..10^5 memory
blocks (bench/trees.py). Budget (DESIGN.md §7): each ≤ 1.0× the reference, at every size."""

import os
import shutil
import statistics
import time
import urllib.request

from observer.model.model import Model
from observer.sources.live import LiveSource

from .processes import EXE, Server, free_port

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
BUDGET = 1.0   # × the reference


def measure(root, rounds, progress):
    """{"reconcile", "scrape", "node_exporter": median seconds} on the views under root."""
    source = LiveSource(root=root)
    model = Model()
    model.feed(source.header(source.read_views()))
    for rec in source.poll(0):
        model.feed(rec)
    time.sleep(1.1)   # a read in the model's first second is never judged: it would cost less
    paths = [] if root == "/" else [f"--path.procfs={root}/proc", f"--path.sysfs={root}/sys"]
    ne_port, our_port = free_port(), free_port()
    with Server([NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{ne_port}",
                 "--collector.disable-defaults", "--collector.zoneinfo", *paths], ne_port), \
            Server([EXE, "run", "--mode", "procfs", "--root", root, "--reconcile-interval", "86400",
                    "--listen", f"127.0.0.1:{our_port}"], our_port):
        times = {"reconcile": [], "scrape": [], "node_exporter": []}
        judged = model.snapshots["judged"]
        for i in range(rounds):
            progress(f"round {i + 1}/{rounds}")
            t = time.perf_counter()
            source.read_views()
            for rec in source.poll(0):
                model.feed(rec)
            times["reconcile"].append(time.perf_counter() - t)
            for name, port in (("scrape", our_port), ("node_exporter", ne_port)):
                t = time.perf_counter()
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
                    r.read()
                times[name].append(time.perf_counter() - t)
    source.close()
    if model.snapshots["judged"] - judged != rounds:
        raise RuntimeError(f"{root}: the model judged {model.snapshots['judged'] - judged} of "
                           f"{rounds} reads ({model.last_unsettled}): not a reconcile's full cost")
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
        for name in ("reconcile", "scrape"):
            ratio = medians[name] / ref
            out.append({"benchmark": f"{name} (median of {n})", "where": where,
                        "measured": f"{medians[name] * 1e3:.2f} ms",
                        "reference": f"node_exporter zoneinfo scrape {ref * 1e3:.2f} ms",
                        "ratio": ratio, "budget": f"≤ {BUDGET:.1f}×", "within": ratio <= BUDGET})
        if size is not None:
            shutil.rmtree(root)   # generated here, nobody else's
    return out
