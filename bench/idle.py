"""The daemon left alone: its CPU time (as a share of one core) and resident memory over a
minute in procfs mode at the default reconcile interval, on this host's views, started and
measured by the benchmark (after 5 s to start). Budget (DESIGN.md §7): ≤ 0.5% of one core."""

import time

from .processes import EXE, Server, free_port

BUDGET_PERCENT = 0.5


def rows(seconds, progress):
    port = free_port()
    with Server([EXE, "run", "--mode", "procfs", "--listen", f"127.0.0.1:{port}"], port) as daemon:
        time.sleep(5)
        cpu, began = daemon.cpu_seconds(), time.monotonic()
        while time.monotonic() - began < seconds:
            progress(f"idle daemon: {time.monotonic() - began:.0f}/{seconds} s")
            time.sleep(min(10, seconds - (time.monotonic() - began)))
        percent = 100 * (daemon.cpu_seconds() - cpu) / (time.monotonic() - began)
        rss = daemon.rss_bytes()
    return [{"benchmark": "idle daemon CPU, procfs mode, 10 s reconcile", "where": "this host",
             "measured": f"{percent:.2f}% of a core (RSS {rss / 2**20:.0f} MiB)",
             "reference": "—", "ratio": None, "budget": f"≤ {BUDGET_PERCENT}% of a core",
             "within": percent <= BUDGET_PERCENT}]
