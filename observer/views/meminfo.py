"""/proc/meminfo: "Key:   value [kB]" per line. Values in kB are returned in bytes."""

import re

from .source import ViewError, read_view, view_path

MEMINFO = "/proc/meminfo"

_LINE = re.compile(r"^([A-Za-z0-9_()]+):\s+(\d+)(?: (kB))?$")


def parse_meminfo(text, path=MEMINFO):
    values = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        m = _LINE.match(raw.strip())
        if not m:
            raise ViewError(path, f"not 'Key: value [kB]': {raw!r}", lineno)
        key, value, unit = m.groups()
        values[key] = int(value) * (1024 if unit else 1)
    if "MemTotal" not in values:
        raise ViewError(path, "no MemTotal line")
    return values


def read_meminfo(root="/"):
    return parse_meminfo(read_view(root, MEMINFO), view_path(root, MEMINFO))
