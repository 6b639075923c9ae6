"""The anomaly record (DESIGN.md §3-4). Kind names and severities are a stable contract."""

from __future__ import annotations

from collections import namedtuple

CRITICAL, WARNING, INFO = "critical", "warning", "info"

SEVERITY = {
    "zone_span_leak": CRITICAL,
    "present_pages_mismatch": CRITICAL,
    "resource_leak": CRITICAL,
    "resource_missing": CRITICAL,
    "device_range_release": WARNING,
    "device_private_conflict": CRITICAL,
    "pagemap_leak": CRITICAL,
    "unbalanced_remove": CRITICAL,
    "unaligned_operation": WARNING,
    "operation_failed": WARNING,
    "device_span_stale": INFO,
    "model_drift": WARNING,
    "events_lost": WARNING,
}


class Anomaly(namedtuple("Anomaly", [
        "kind",
        "message",     # one human sentence
        "ts_ns", "node", "zone", "start_pfn",
        "end_pfn",     # exclusive
        "evidence",    # [str]
        "severity",    # the kind's, unless said
        # a state a judged read of the views shows (a leak), open until a read no longer shows
        # it; else the anomaly is about one call or one loss at ts_ns
        "standing",
])):
    __slots__ = ()

    def __new__(cls, kind, message, ts_ns, node=None, zone=None, start_pfn=None, end_pfn=None,
                evidence=None, severity="", standing=False):
        if kind not in SEVERITY:
            raise ValueError(f"unknown anomaly kind {kind!r}")
        return super().__new__(cls, kind, message, ts_ns, node, zone, start_pfn, end_pfn,
                               [] if evidence is None else evidence,
                               severity or SEVERITY[kind], standing)

    def to_dict(self):
        return self._asdict()
