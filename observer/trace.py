"""Trace format v1 (DESIGN.md §4): JSON Lines, every line an object with a `type`: header,
event, snapshot, anomaly, lost, uevent (memory blocks, from netlink), begun (a call still running
when later calls were released: its event follows later with the same seq) and skipped (a call
number with no event: lost). The writer puts out every line whole as it is written; the reader
streams and names the file and line of anything malformed."""

import json

FORMAT, VERSION = "memhp-trace", 1
TYPES = ("header", "event", "snapshot", "anomaly", "lost", "uevent", "begun", "skipped")
# fields every line of a type must carry
REQUIRED = {
    "header": ("format", "version", "kernel", "page_size", "block_size", "mode", "start_time_ns"),
    "event": ("seq", "ts_ns", "fn", "ret", "pid", "comm", "caller", "origin"),
    "snapshot": ("ts_ns", "zones", "memory_blocks", "resources"),
    "anomaly": ("kind", "severity", "ts_ns", "message", "evidence"),
    "lost": ("ts_ns", "count"),
    "uevent": ("ts_ns", "action", "block"),
    "begun": ("seq", "ts_ns", "fn", "pid", "comm", "origin"),
    "skipped": ("seq", "reason"),
}


class TraceError(Exception):
    def __init__(self, path, line, message):
        self.path, self.line, self.message = path, line, message
        super().__init__(f"{path}:{line}: {message}")


class TraceWriteError(Exception):
    """A trace that cannot be created or written: one line naming the path."""


class TraceWriter:
    """A new trace file, never written over an existing one (nor over a device such as
    /dev/full). Each line goes out whole as it is written; when a write fails (disk full), the
    file is cut back to its last whole line, so what was recorded stays a readable trace."""

    def __init__(self, path):
        self.path = path
        try:
            self.file = open(path, "xb", buffering=0)
        except FileExistsError:
            raise TraceWriteError(f"{path}: exists; record writes a new file, never over one") from None
        except OSError as e:
            raise TraceWriteError(f"{path}: {e.strerror or e}") from None
        self.lines = 0
        self.size = 0

    def write(self, record):
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        try:
            view = memoryview(data)
            while view:
                view = view[self.file.write(view):]
        except OSError as e:
            try:
                self.file.truncate(self.size)
            except OSError:
                pass
            raise TraceWriteError(f"{self.path}: {e.strerror or e} after {self.lines} lines") from None
        self.size += len(data)
        self.lines += 1

    def close(self):
        self.file.close()


def read_trace(path):
    """Yield the records of a trace, checked: a header first, known types, required fields."""
    for _, rec in read_trace_lines(path):
        yield rec


def read_trace_lines(path):
    """(line number, record) of each record of a trace, checked as read_trace checks them."""
    try:
        f = open(path)
    except OSError as e:
        raise TraceError(path, 0, e.strerror or str(e)) from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(path, lineno, f"not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or rec.get("type") not in TYPES:
                raise TraceError(path, lineno, f"unknown record type {rec.get('type') if isinstance(rec, dict) else rec!r}")
            if lineno == 1 and rec["type"] != "header":
                raise TraceError(path, lineno, "the first line must be the header")
            if rec["type"] == "header" and (rec.get("format"), rec.get("version")) != (FORMAT, VERSION):
                raise TraceError(path, lineno, f"not a {FORMAT} v{VERSION} trace")
            missing = [k for k in REQUIRED[rec["type"]] if k not in rec]
            if missing:
                raise TraceError(path, lineno, f"{rec['type']} without {', '.join(missing)}")
            yield lineno, rec
