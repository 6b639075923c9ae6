"""The anomaly record (DESIGN.md §3-4). Kind names and severities are a stable contract."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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


@dataclass
class Anomaly:
    kind: str
    message: str                  # one human sentence
    ts_ns: int
    node: int | None = None
    zone: str | None = None
    start_pfn: int | None = None
    end_pfn: int | None = None  # exclusive
    evidence: list[str] = field(default_factory=list)
    severity: str = ""
    # a state a judged read of the views shows (a leak), open until a read no longer shows it;
    # else the anomaly is about one call or one loss at ts_ns
    standing: bool = False

    def __post_init__(self):
        if self.kind not in SEVERITY:
            raise ValueError(f"unknown anomaly kind {self.kind!r}")
        self.severity = self.severity or SEVERITY[self.kind]

    def to_dict(self):
        return asdict(self)
