"""Trace format v1 (DESIGN.md §4): JSON Lines, every line an object with a `type`: header,
event, snapshot, anomaly, lost, uevent (memory blocks, from netlink), begun (a call still running
when later calls were released: its event follows later with the same seq) and skipped (call
numbers with no event: lost; `count` consecutive numbers from `seq`, 1 when absent). The writer puts out every line whole as it is written; the reader
streams and names the file and line of anything malformed."""

import json
import operator
import os

from .rotate import rotate

FORMAT, VERSION = "memhp-trace", 1
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

# one C call per record: raises KeyError when a field is missing
_HAS_REQUIRED = {kind: operator.itemgetter(*keys) for kind, keys in REQUIRED.items()}


class TraceError(Exception):
    def __init__(self, path, line, message):
        self.path, self.line, self.message = path, line, message
        super().__init__(f"{path}:{line}: {message}")


class TraceWriteError(Exception):
    """A trace that cannot be created or written: one line naming the path."""


class TraceWriter:
    """A new trace file, never written over an existing one (nor over a device such as
    /dev/full). Each line goes out whole as it is written; when a write fails (disk full), the
    file is cut back to its last whole line, so what was recorded stays a readable trace.

    Bounded (max_bytes): once the file holds that much, the next snapshot record begins a new
    one (PATH moves to PATH.1, PATH.1 to PATH.2, … up to PATH.KEEP): the header, then that
    snapshot, so every file is a trace `replay` judges on its own. reopen() (SIGHUP) begins a
    new PATH at the next snapshot record too, when PATH was moved away."""

    def __init__(self, path, max_bytes=None, keep=4):
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        self.file = self._create()
        self.lines = 0
        self.size = 0
        self.header = None
        self.reopen_wanted = False

    def _create(self):
        try:
            return open(self.path, "xb", buffering=0)
        except FileExistsError:
            raise TraceWriteError(f"{self.path}: exists; record writes a new file, never over "
                                  f"one") from None
        except OSError as e:
            raise TraceWriteError(f"{self.path}: {e.strerror or e}") from None

    def reopen(self):
        self.reopen_wanted = True

    def _begin_new_file(self, rotating):
        self.file.close()
        if rotating:
            try:
                rotate(self.path, self.keep)
            except OSError as e:
                raise TraceWriteError(f"{self.path}: cannot rotate: {e.strerror or e}") from None
        self.file = self._create()
        self.lines = self.size = 0
        self.write(self.header)

    def write(self, record):
        if record["type"] == "header":
            self.header = record
        elif record["type"] == "snapshot" and self.header is not None:
            if self.max_bytes and self.size >= self.max_bytes:
                self._begin_new_file(rotating=True)
            elif self.reopen_wanted:
                self.reopen_wanted = False
                if not os.path.exists(self.path):   # moved away (logrotate): a new one
                    self._begin_new_file(rotating=False)
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
    """(line number, record) of each record of a trace, checked as read_trace checks them.
    orjson parses: Python's json module alone takes longer than replay may spend a record."""
    import orjson   # here: the daemon, which reads no trace, starts without it (and its uuid)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TraceError(path, 0, e.strerror or str(e)) from None
    with f:
        for lineno, line in enumerate(f, 1):
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                if not line.strip():
                    continue
                raise TraceError(path, lineno, f"not JSON ({e.msg})") from None
            try:
                kind = rec["type"]
                has_required = _HAS_REQUIRED[kind]
            except (KeyError, TypeError, IndexError):   # not an object, or no known type
                raise TraceError(path, lineno, "unknown record type "
                                 f"{rec.get('type') if type(rec) is dict else rec!r}") from None
            if kind == "header":
                if (rec.get("format"), rec.get("version")) != (FORMAT, VERSION):
                    raise TraceError(path, lineno, f"not a {FORMAT} v{VERSION} trace")
            elif lineno == 1:
                raise TraceError(path, lineno, "the first line must be the header")
            try:
                has_required(rec)
            except KeyError:
                missing = [k for k in REQUIRED[kind] if k not in rec]
                raise TraceError(path, lineno, f"{kind} without {', '.join(missing)}") from None
            yield lineno, rec
