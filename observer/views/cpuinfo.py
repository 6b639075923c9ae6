"""The end of the physical address space, from /proc/cpuinfo: the CPU's physical address bits
("address sizes : 40 bits physical, 48 bits virtual") and, on x86-64, the kernel's own limit
MAX_PHYSMEM_BITS: 46 with 4-level paging, 52 with 5-level (the la57 flag shows it in use)."""

import re

from .source import ViewError, read_file, view_lines, view_path

CPUINFO = "/proc/cpuinfo"
MAX_PHYSMEM_BITS = {False: 46, True: 52}   # x86-64, by 5-level paging


def address_bits(root="/"):
    """{"physical": N, "max_physmem": M, "line": "/proc/cpuinfo:L ..."} from the first CPU's
    entry, or None where cpuinfo names no address sizes (not x86) or cannot be read."""
    try:
        text = read_file(view_path(root, CPUINFO)).decode("ascii", "replace")
    except ViewError:
        return None
    physical = line = None
    la57 = False
    for n, text_line in enumerate(view_lines(text), 1):
        if not text_line.strip():
            break   # the first CPU's entry ends here
        m = re.match(r"address sizes\s*:\s*(\d+) bits physical", text_line)
        if m:
            physical, line = int(m.group(1)), f"{CPUINFO}:{n} {' '.join(text_line.split())}"
        elif re.match(r"flags\s*:", text_line):
            la57 = "la57" in text_line.split(":", 1)[1].split()
    if physical is None:
        return None
    return {"physical": physical, "max_physmem": MAX_PHYSMEM_BITS[la57], "line": line}
