"""Prometheus exposition of the daemon's current state (DESIGN.md §4): a collector with no state
of its own (each scrape renders the last reconciled State), the text it is written in, and the
listener that serves it."""

import math
import os
import resource
import socket
import socketserver
import threading
import time

from . import __version__
from .model.anomaly import SEVERITY
from .probes.functions import ALL as PROBED_FUNCTIONS
from .formats import hotplug_resources

# memhp_operation_duration_seconds: a section's add takes microseconds, a big offline minutes
DURATION_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60,
                    300)


class Family:
    """One metric family as the text format writes it: samples (name, labels, value) under one
    HELP and TYPE. A counter's samples are named NAME_total; a histogram's NAME_bucket (le
    labelled, cumulative), NAME_count and NAME_sum. The daemon writes the format itself:
    prometheus_client's import (its HTTP server, ssl and email packages) was half the daemon's."""

    def __init__(self, type, name, documentation, labels=()):
        self.type, self.name, self.documentation, self.labels = type, name, documentation, labels
        self.samples = []

    def add_metric(self, label_values, value):
        name = self.name + "_total" if self.type == "counter" else self.name
        self.samples.append((name, dict(zip(self.labels, label_values)), value))

    def add_histogram(self, label_values, cumulative_buckets, sum_value):
        labels = dict(zip(self.labels, label_values))
        for le, count in cumulative_buckets:
            self.samples.append((self.name + "_bucket", dict(labels, le=le), count))
        self.samples.append((self.name + "_count", labels, cumulative_buckets[-1][1]))
        self.samples.append((self.name + "_sum", labels, sum_value))


class ProcessCollector:
    """The daemon's own process_* metrics, as Prometheus client libraries name them, from
    /proc/self (Linux only, as the daemon is)."""
    TICKS, PAGE = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")

    def collect(self):
        with open("/proc/self/stat", "rb") as f:
            # the fields after the command's closing parenthesis, from state (field 3) on
            stat = f.read().rsplit(b")", 1)[1].split()
        utime, stime, start, vsize, rss = (int(stat[i]) for i in (11, 12, 19, 20, 21))
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        for type, name, doc, value in (
                ("gauge", "process_virtual_memory_bytes", "Virtual memory size in bytes.", vsize),
                ("gauge", "process_resident_memory_bytes", "Resident memory size in bytes.",
                 rss * self.PAGE),
                ("gauge", "process_start_time_seconds",
                 "Start time of the process since unix epoch in seconds.",
                 boot + start / self.TICKS),
                ("counter", "process_cpu_seconds", "Total user and system CPU time spent in "
                 "seconds.", (utime + stime) / self.TICKS),
                ("gauge", "process_open_fds", "Number of open file descriptors.",
                 len(os.listdir("/proc/self/fd"))),
                ("gauge", "process_max_fds", "Maximum number of open file descriptors.",
                 resource.getrlimit(resource.RLIMIT_NOFILE)[0])):
            family = Family(type, name, doc)
            family.add_metric([], value)
            yield family


def block_counts(blocks):
    """(node, zone, state) -> memory blocks: counted once per reconcile, not at every scrape
    (a scrape costs the same on any number of blocks)."""
    counts = {}
    for r in blocks.runs:
        # offline blocks, and online blocks spanning several zones, are in no single zone:
        # "none", the kernel's own word in valid_zones
        key = ("" if r.node is None else str(r.node), r.zone or "none", r.state)
        counts[key] = counts.get(key, 0) + r.last - r.first + 1
    return counts


class StateCollector:
    def __init__(self, daemon_state):
        self.state = daemon_state   # anything with a .current attribute holding a State

    def describe(self):
        return []   # families vary with the host; no registration-time checks needed

    def collect(self):
        s = self.state.current
        info = Family("gauge", "memhp_build_info", "memhp-observer version, kernel and mode",
                      labels=["version", "kernel", "mode"])
        info.add_metric([__version__, s.kernel, s.mode], 1)
        yield info

        probe = Family("gauge", "memhp_probe_attached",
                       "1 when the probe on this kernel function is attached",
                       labels=["function", "method"])
        for fn in PROBED_FUNCTIONS:
            method = s.probe_methods.get(fn, "none")
            probe.add_metric([fn, method], 1 if method != "none" else 0)
        yield probe

        events = Family("counter", "memhp_events", "Calls of the watched kernel functions the "
                        "probes saw, by who asked and how they returned",
                        labels=["function", "origin", "result"])
        for (fn, origin, result), n in sorted(self.state.events.items()):
            events.add_metric([fn, origin, result], n)
        yield events
        lost = Family("counter", "memhp_events_lost", "Probe events the BPF buffer dropped")
        lost.add_metric([], self.state.events_lost)
        yield lost
        yield self._durations()
        pagemaps = Family("gauge", "memhp_device_pagemap_bytes", "Bytes of ZONE_DEVICE pagemaps "
                          "mapped, by type (BPF mode: known from the probes' events)",
                          labels=["type"])
        for kind, size in sorted(s.pagemap_bytes.items()):
            pagemaps.add_metric([kind], size)
        yield pagemaps

        last = Family("gauge", "memhp_last_reconcile_timestamp_seconds",
                      "Unix time of the last reconcile from the kernel views")
        dur = Family("gauge", "memhp_reconcile_duration_seconds",
                     "How long the last reconcile from the kernel views took")
        uevents = Family("counter", "memhp_uevents", "Memory-block uevents seen, by action "
                         "(each one triggers a reconcile)", labels=["action"])
        for action in ("add", "remove", "online", "offline"):
            uevents.add_metric([action], self.state.uevents.get(action, 0))
        yield uevents
        running = Family("gauge", "memhp_reconcile_running_seconds", "How long the reconcile "
                         "in progress has run (0 when none is): growing, a kernel view "
                         "does not answer and the values below are the last complete")
        running.add_metric([], self.state.running_seconds())
        yield running
        errors = Family("counter", "memhp_reconcile_errors",
                        "Reconciles that could not read a kernel view")
        errors.add_metric([], s.reconcile_errors)
        yield errors
        reads = Family("counter", "memhp_snapshots", "Reads of the kernel views the model "
                       "judged, or left unjudged because hotplug was in flight",
                       labels=["verdict"])
        for verdict in ("judged", "unsettled"):
            reads.add_metric([verdict], s.snapshots.get(verdict, 0))
        yield reads
        if s.snapshot is None:
            return
        last.add_metric([], s.reconciled_at)
        dur.add_metric([], s.reconcile_seconds)
        yield last
        yield dur

        start = Family("gauge", "memhp_zone_start_pfn", "First pfn of the zone's span "
                       "(absent while the zone has no present pages)", labels=["node", "zone"])
        spanned = Family("gauge", "memhp_zone_spanned_pages", "Pages the zone spans, holes included",
                         labels=["node", "zone"])
        present = Family("gauge", "memhp_zone_present_pages", "Pages present in the zone",
                         labels=["node", "zone"])
        for z in s.snapshot.zones:
            labels = [str(z.node), z.name]
            if z.start_pfn is not None:
                start.add_metric(labels, z.start_pfn)
            spanned.add_metric(labels, z.spanned)
            present.add_metric(labels, z.present)
        yield start
        yield spanned
        yield present

        blocks = Family("gauge", "memhp_memory_blocks", "Memory blocks by node, zone and state",
                        labels=["node", "zone", "state"])
        for (node, zone, state), n in sorted(s.block_counts.items()):
            blocks.add_metric([node, zone, state], n)
        yield blocks
        offline = Family("gauge", "memhp_memory_block_offline_seconds", "How long the block "
                         "offline longest on the node has been offline (present "
                         "memory nobody onlined), counted from this daemon's start "
                         "at most", labels=["node"])
        now, longest = time.monotonic(), {}
        for _, _, (node, since) in s.offline_since.items():
            key = "" if node is None else str(node)
            longest[key] = max(longest.get(key, 0.0), now - since)
        for node, seconds in sorted(longest.items()):
            offline.add_metric([node], seconds)
        yield offline
        policy = Family("gauge", "memhp_auto_online_blocks", "1 for the kernel's policy for "
                        "hot-added blocks (/sys/devices/system/memory/"
                        "auto_online_blocks)", labels=["policy"])
        if s.snapshot.blocks.auto_online:
            policy.add_metric([s.snapshot.blocks.auto_online], 1)
        yield policy

        if s.snapshot.resources is not None:
            res = Family("gauge", "memhp_resource_bytes", "Bytes of iomem resources hotplug "
                         "touches, by type", labels=["type"])
            totals = {}
            for r in hotplug_resources(s.snapshot.resources):
                totals[r["type"]] = totals.get(r["type"], 0) + r["size"]
            for kind, size in sorted(totals.items()):
                res.add_metric([kind], size)
            yield res

        active = Family("gauge", "memhp_anomalies_active", "Anomalies present in the last "
                        "reconcile, by kind", labels=["kind"])
        total = Family("counter", "memhp_anomalies", "Anomalies reported since start "
                       "(each counted once while it stays present)",
                       labels=["kind", "severity"])
        for kind in sorted(SEVERITY):
            active.add_metric([kind], sum(1 for a in s.anomalies if a.kind == kind))
        # every kind at its usual severity, and where one was said at another (an info failure)
        for kind, severity in sorted(set(s.anomalies_reported) | set(SEVERITY.items())):
            total.add_metric([kind, severity], s.anomalies_reported.get((kind, severity), 0))
        yield active
        yield total

        leak = Family("gauge", "memhp_zone_span_leak_pages", "Pages of zone span beyond the "
                      "zone's online memory over blocks not online in it",
                      labels=["node", "zone"])
        for z in s.snapshot.zones:
            # a leak in a zone with no present pages has no start shown: all its span leaks
            pages = sum(z.spanned if a.start_pfn is None else a.end_pfn - a.start_pfn
                        for a in s.anomalies
                        if a.kind == "zone_span_leak" and a.zone == z.name and a.node == z.node)
            leak.add_metric([str(z.node), z.name], pages)
        yield leak
        rleak = Family("gauge", "memhp_resource_leak_bytes", "Bytes of System RAM resources "
                       "with no memory block under them")
        rleak.add_metric([], sum((a.end_pfn - a.start_pfn) * s.snapshot.page_size for a in s.anomalies
                                 if a.kind == "resource_leak"))
        yield rleak

    def _durations(self):
        hist = Family("histogram", "memhp_operation_duration_seconds", "How long the watched "
                      "kernel calls took, entry to return (BPF mode)",
                      labels=["function"])
        for fn, counts in sorted(dict(self.state.durations).items()):
            counts, total, cumulative = list(counts), counts[-1], 0
            buckets = []
            for le, n in zip([*map(str, DURATION_BUCKETS), "+Inf"], counts[:-1]):
                cumulative += n
                buckets.append((le, cumulative))
            hist.add_histogram([fn], buckets, total)
        return hist


RESPONSE_HEAD = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                 b"Content-Length: %d\r\n\r\n")
MAX_REQUEST_LINES, MAX_REQUEST_LINE = 100, 65536   # bytes; a request is a line and its headers


def exposition(collectors):
    """The text format (0.0.4) of the families the collectors yield."""
    out = []
    for collector in collectors:
        for family in collector.collect():
            name = family.name + "_total" if family.type == "counter" else family.name
            doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
            out.append(f"# HELP {name} {doc}\n# TYPE {name} {family.type}\n")
            for sample, labels, value in family.samples:
                labels = ",".join(f'{k}="{_escaped(v)}"' for k, v in sorted(labels.items()))
                out.append(f"{sample}{{{labels}}} " if labels else f"{sample} ")
                out.append(_number(value) + "\n")
    return "".join(out).encode()


def _number(value):
    value = float(value)
    if value != value:
        return "NaN"
    return repr(value) if abs(value) != math.inf else "+Inf" if value > 0 else "-Inf"


def _escaped(label_value):
    return label_value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def serve(host, port, collectors):
    """/metrics on host:port, a thread for each scrape. OSError when the port is taken."""
    class Handler(socketserver.StreamRequestHandler):
        """One scrape: the request read to its blank line (no path, method or header matters:
        every request gets /metrics), the exposition written, the connection closed
        (HTTP/1.0). http.server parsed each header with the email package: a fifth of a
        scrape."""
        timeout = 30   # seconds a client may take to send its request, or to read the answer

        def handle(self):
            try:
                for _ in range(MAX_REQUEST_LINES):
                    if self.rfile.readline(MAX_REQUEST_LINE) in (b"\r\n", b"\n", b""):
                        break
                body = exposition(collectors)
                self.wfile.write(RESPONSE_HEAD % len(body) + body)
            except OSError:   # a client that hung up or stalled
                pass

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True   # a restart binds at once, past the old connections' TIME_WAIT
        # AF_INET6 for an IPv6 address (TCPServer binds AF_INET only). An ASCII host as bytes:
        # as text, getaddrinfo imports the idna codec first (a fiftieth of a start under TCG)
        address_family = socket.getaddrinfo(host.encode() if host.isascii() else host, port,
                                            type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    server = Server((host, port), Handler)
    # no poll interval: it only bounds how soon shutdown() is seen, and the server lives as long
    # as the process (the default woke it twice a second for nothing)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": None}, name="metrics",
                     daemon=True).start()
