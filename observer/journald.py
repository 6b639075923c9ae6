"""One structured journald entry per anomaly (DESIGN.md §6), sent over journald's native
protocol: one datagram to its socket, fields as KEY=value lines, or KEY, a 64-bit little-endian
length and the bytes for a value with newlines (systemd's "Native Journal Protocol"). No library:
where no journald runs (no socket), nothing is sent.

MESSAGE_ID is one UUID per anomaly kind, stable across versions (`journalctl MESSAGE_ID=...`
finds every zone_span_leak); the other fields are MEMHP_*."""

import os
import socket
import struct

from .report import anomaly_headline

SOCKET = "/run/systemd/journal/socket"
# syslog priorities: crit, warning, info
PRIORITY = {"critical": 2, "warning": 4, "info": 6}
MAX_EVIDENCE = 16 << 10   # the journal file keeps all of it; a datagram stays small


# imported where used (uuid brings platform): as journal.DEFERRED_IMPORTS
DEFERRED_IMPORTS = ("uuid",)


def message_id(kind):
    import uuid   # DEFERRED_IMPORTS
    return uuid.uuid5(uuid.NAMESPACE_DNS, f"{kind}.anomaly.memhp-observer").hex


def fields(anomaly, journal_id=None):
    out = {"MESSAGE": anomaly_headline(anomaly), "MESSAGE_ID": message_id(anomaly.kind),
           "PRIORITY": PRIORITY[anomaly.severity], "SYSLOG_IDENTIFIER": "memhp-observer",
           "MEMHP_KIND": anomaly.kind, "MEMHP_SEVERITY": anomaly.severity,
           "MEMHP_TS_NS": anomaly.ts_ns, "MEMHP_STANDING": int(anomaly.standing),
           "MEMHP_EVIDENCE": "\n".join(anomaly.evidence)[:MAX_EVIDENCE]}
    for name in ("node", "zone", "start_pfn", "end_pfn"):
        value = getattr(anomaly, name)
        if value is not None:
            out[f"MEMHP_{name.upper()}"] = value
    if journal_id:
        out["MEMHP_ID"] = journal_id
    return out


def encode(entry):
    data = bytearray()
    for key, value in entry.items():
        value = str(value).encode()
        if b"\n" in value:
            data += key.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
        else:
            data += key.encode() + b"=" + value + b"\n"
    return bytes(data)


def stderr_is_journal():
    """True when systemd connected stderr to the journal ($JOURNAL_STREAM names its device and
    inode): an anomaly journald took as an entry is then not logged a second time as text."""
    try:
        dev, ino = (int(x) for x in os.environ["JOURNAL_STREAM"].split(":"))
        st = os.fstat(2)
    except (KeyError, ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class Journald:
    def __init__(self, path=SOCKET):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def send(self, anomaly, journal_id=None):
        """True when journald took the entry; False where none listens."""
        try:
            self.sock.sendto(encode(fields(anomaly, journal_id)), self.path)
            return True
        except OSError:
            return False

    def close(self):
        self.sock.close()
