"""Copy the kernel views the readers use into a directory with the same layout, so that a real
machine's state becomes a test fixture or a bug report (`memhp-observer capture -o DIR`)."""

import os
import shutil
import subprocess

from .views.iomem import IOMEM
from .views.memory_blocks import MEMORY, block_indexes
from .views.source import view_path
from .views.zoneinfo import ZONEINFO

# /proc/meminfo is no reader's input; it is kept as context for whoever reads the capture
FILES = (ZONEINFO, IOMEM, "/proc/meminfo", "/proc/sys/kernel/osrelease")
BLOCK_ATTRS = ("phys_index", "state", "valid_zones", "removable", "online", "phys_device")
ROOT_ATTRS = ("block_size_bytes", "auto_online_blocks")
# What an unprivileged reader of /proc/iomem sees (all addresses zero), kept beside the real one.
IOMEM_UNPRIVILEGED = "/proc/iomem.unprivileged"


def _copy(src_root, dst_root, relpath):
    src, dst = view_path(src_root, relpath), view_path(dst_root, relpath)
    if not os.path.exists(src):
        return False
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data)
    return True


def capture(out, src="/"):
    """Write the views under src into out; returns the number of files written."""
    if os.path.exists(out):
        shutil.rmtree(out)
    n = sum(_copy(src, out, p) for p in FILES)
    n += sum(_copy(src, out, f"{MEMORY}/{a}") for a in ROOT_ATTRS)
    for i in block_indexes(src):
        d = f"{MEMORY}/memory{i}"
        n += sum(_copy(src, out, f"{d}/{a}") for a in BLOCK_ATTRS)
        for name in os.listdir(view_path(src, d)):
            if name.startswith("node") and name[4:].isdigit():
                # the nodeN link is kept as a link (the readers need only its name; git keeps
                # links but not empty directories)
                link = view_path(out, f"{d}/{name}")
                os.symlink(os.readlink(view_path(src, f"{d}/{name}")), link)
    if src == "/" and os.geteuid() == 0:
        seen = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "cat", IOMEM], capture_output=True, text=True, check=True).stdout
        with open(view_path(out, IOMEM_UNPRIVILEGED), "w") as f:
            f.write(seen)
        n += 1
    return n
