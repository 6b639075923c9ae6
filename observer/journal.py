"""The anomaly journal (`run --journal PATH`, DESIGN.md §4): append-only JSON Lines, one record
per anomaly the daemon reports, written, flushed and fsynced before the anomaly is said anywhere
else, and rotated by size (PATH.1 the newest rotated file, up to PATH.KEEP).

Across restarts within one boot nothing is lost or said twice. An anomaly is *standing* when it
is a state the views show (a leak found in a read), reported once and open until a judged read
no longer shows it (then a `cleared` record closes it); the journal keeps the open ones, and one
found again after a restart is the same anomaly, not a new one. Any other anomaly is about one
call at one instant (its ts_ns, CLOCK_MONOTONIC) and cannot come twice. A restart after a reboot
starts afresh: its boot_id differs.

Each file begins with a `journal` line naming its boot and the anomalies open when it began, so
the newest file alone tells a restart what is open. A line torn by a kill mid-write stays where
it is, ended by a newline, and is skipped."""

import json
import os
import time

from .rotate import rotate

FORMAT, VERSION = "memhp-journal", 1
MAX_BYTES = 16 << 20
KEEP = 4


class JournalError(Exception):
    pass


def boot_id(path="/proc/sys/kernel/random/boot_id"):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise JournalError(f"{path}: {e.strerror}: the journal needs this boot's id") from None


# imported where used, not with this module: off every start's way (a twentieth of its
# imports); the daemon imports them once READY is said, off the first anomaly's way too
DEFERRED_IMPORTS = ("hashlib",)


def _utc_now():
    """The time now as datetime's isoformat(timespec="milliseconds") gives it in UTC
    (2026-12-07T16:25:00.123+00:00), without datetime: a start writes the journal's first line
    before READY, and importing datetime was a sixtieth of a start under TCG."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}+00:00"


def identity(anomaly):
    """What makes two reports the same anomaly: where it is, and for an anomaly about one call
    also when."""
    key = [anomaly.kind, anomaly.node, anomaly.zone, anomaly.start_pfn, anomaly.end_pfn]
    if not anomaly.standing:
        key.append(anomaly.ts_ns)
    import hashlib   # DEFERRED_IMPORTS
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]


class Journal:
    def __init__(self, path, boot, max_bytes=MAX_BYTES, keep=KEEP):
        self.path, self.boot, self.max_bytes, self.keep = path, boot, max_bytes, keep
        self.open_ids = {}     # id -> kind of the standing anomalies reported and not cleared
        self.f = None
        self._open(self._read())

    def _read(self):
        """The open anomalies of this boot from the newest file, and what the file holds (b""
        when there is none); JournalError when PATH is not a journal (never written into)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return b""
        except OSError as e:
            raise JournalError(f"{self.path}: {e.strerror}") from None
        for number, raw in enumerate(data.split(b"\n"), 1):
            if not raw:
                continue
            try:
                rec = json.loads(raw)
                kind = rec["type"]
            except (ValueError, TypeError, KeyError):
                rec, kind = None, None
            if number == 1 and (kind != "journal" or rec.get("format") != FORMAT):
                raise JournalError(f"{self.path}:1: not a memhp-observer journal: not writing "
                                   f"into it (name another --journal file)")
            if kind is None or rec.get("boot_id") != self.boot:
                continue     # a line torn by a kill, or another boot's
            elif kind == "journal":
                self.open_ids = dict(rec.get("open") or {})
            elif kind == "anomaly" and rec.get("standing"):
                self.open_ids[rec["id"]] = rec["kind"]
            elif kind == "cleared":
                self.open_ids.pop(rec["id"], None)
        return data

    def _open(self, data):
        """Append to PATH, which held `data`: a new file begins with its journal line."""
        try:
            self.f = open(self.path, "ab")
            if not data:
                self._begin()
            elif not data.endswith(b"\n"):   # a torn last line: end it, so it stays alone
                self._write_raw(b"\n")
        except OSError as e:
            raise JournalError(f"{self.path}: {e.strerror}") from None

    def _begin(self):
        self._write({"type": "journal", "format": FORMAT, "version": VERSION,
                     "boot_id": self.boot, "open": self.open_ids})

    def _write_raw(self, data):
        self.f.write(data)
        self.f.flush()
        os.fsync(self.f.fileno())

    def _write(self, rec):
        rec = dict(rec, boot_id=self.boot, time=_utc_now())
        line = (json.dumps(rec) + "\n").encode()
        if rec["type"] != "journal" and self.f.tell() + len(line) > self.max_bytes:
            self._rotate()
        self._write_raw(line)

    def _rotate(self):
        self.f.close()
        rotate(self.path, self.keep)
        self.f = open(self.path, "ab")
        self._begin()
        directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(directory)   # the renames are durable too
        finally:
            os.close(directory)

    def known(self, anomaly):
        """Reported already and still open: a standing anomaly found again after a restart."""
        return anomaly.standing and identity(anomaly) in self.open_ids

    def report(self, anomaly):
        """Write one anomaly (durably) before it is said anywhere else."""
        ident = identity(anomaly)
        self._write(dict({"type": "anomaly", "id": ident}, **anomaly.to_dict()))
        if anomaly.standing:
            self.open_ids[ident] = anomaly.kind

    def clear(self, anomaly, ts_ns):
        """A standing anomaly that the read at ts_ns no longer shows."""
        ident = identity(anomaly)
        if self.open_ids.pop(ident, None) is not None:
            self._write({"type": "cleared", "id": ident, "kind": anomaly.kind, "ts_ns": ts_ns})

    def reopen(self):
        """SIGHUP: close and open PATH again (after an outside rotation it is a new file)."""
        self.f.close()
        self._open(self._read())

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None
