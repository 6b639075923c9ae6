"""Copy the kernel views the readers use into a directory with the same layout, so that a real
machine's state becomes a test fixture or a bug report (`memhp-observer capture -o DIR`).

Run as root, a capture must never delete what it did not write: it writes into a new directory
beside the output and moves it into place only once complete, into a path that is new or empty,
or (--replace) that holds an earlier capture and nothing else."""

import os
import re
import shutil
import subprocess
import tempfile

from .views.iomem import IOMEM, read_iomem
from .views.memory_blocks import MEMORY, NODE_LINK, block_indexes
from .views.source import read_file, view_path
from .views.zoneinfo import ZONEINFO

# /proc/meminfo is no reader's input; it is kept as context for whoever reads the capture
FILES = (ZONEINFO, IOMEM, "/proc/meminfo", "/proc/sys/kernel/osrelease")
BLOCK_ATTRS = ("phys_index", "state", "valid_zones", "removable", "online", "phys_device")
ROOT_ATTRS = ("block_size_bytes", "auto_online_blocks")
# What an unprivileged reader of /proc/iomem sees (all addresses zero), kept beside the real one.
IOMEM_UNPRIVILEGED = "/proc/iomem.unprivileged"

# every path a capture writes, relative to its top: what --replace may remove
_WRITTEN = re.compile("^(?:{})$".format("|".join(
    [re.escape(p.lstrip("/")) for p in FILES + (IOMEM_UNPRIVILEGED,)]
    + [re.escape(f"{MEMORY.lstrip('/')}/{a}") for a in ROOT_ATTRS]
    + [re.escape(MEMORY.lstrip("/")) + r"/memory[0-9]+/(?:{}|node[0-9]+)".format(
        "|".join(map(re.escape, BLOCK_ATTRS)))])))


class CaptureError(Exception):
    """A capture refused or failed: one line naming the path."""


def capture(out, src="/", replace=False):
    """Write the views under src into out; returns the number of files written."""
    _refuse_unsafe(out, src, replace)
    if src == "/":
        read_iomem(src)   # IomemHidden when the addresses read as zero: not a capture to keep
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        new = tempfile.mkdtemp(prefix=".memhp-capture-", dir=parent)
    except OSError as e:
        raise CaptureError(f"{parent}: {e.strerror or e}") from None
    try:
        n = _write(src, new)
        os.chmod(new, 0o755)
        if os.path.isdir(out):
            _swap_contents(out, new, parent)
        else:
            os.rename(new, out)
        return n
    except OSError as e:
        raise CaptureError(f"{e.filename or out}: {e.strerror or e}") from None
    except subprocess.CalledProcessError as e:
        raise CaptureError(f"reading {IOMEM} as nobody: {e.stderr.strip() or e}") from None
    finally:
        shutil.rmtree(new, ignore_errors=True)   # ours; gone already when it became out


def _refuse_unsafe(out, src, replace):
    real_out, real_src = os.path.realpath(out), os.path.realpath(src)
    if real_out == real_src or real_src.startswith(real_out.rstrip("/") + "/"):
        raise CaptureError(f"{out}: refusing to capture into the tree it reads ({src})")
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise CaptureError(f"{out}: exists and is not a directory")
    try:
        foreign = _not_written_by_capture(out)
    except OSError as e:
        raise CaptureError(f"{out}: {e.strerror or e}") from None
    if foreign is None:
        if os.listdir(out) and not replace:
            raise CaptureError(f"{out}: holds an earlier capture; --replace replaces it")
        return
    raise CaptureError(f"{out}: not empty ({foreign} is not a capture's): capture writes only "
                       f"into a new or empty directory, or replaces an earlier capture")


def _not_written_by_capture(top):
    """The first file under top that a capture does not write, or None."""
    for dirpath, dirs, files in os.walk(top):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.relpath(os.path.join(dirpath, name), top)
            if not _WRITTEN.match(rel):
                return rel
    return None


def _swap_contents(out, new, parent):
    """Put new's contents in out (new or an earlier capture: checked), removing the old ones.
    Entry by entry, so that out may be the current directory."""
    old = tempfile.mkdtemp(prefix=".memhp-replaced-", dir=parent)
    try:
        for name in os.listdir(out):
            os.rename(os.path.join(out, name), os.path.join(old, name))
        for name in os.listdir(new):
            os.rename(os.path.join(new, name), os.path.join(out, name))
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _copy(src_root, dst_root, relpath):
    src, dst = view_path(src_root, relpath), view_path(dst_root, relpath)
    if not os.path.lexists(src):
        return False
    data = read_file(src)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb") as f:
        f.write(data)
    return True


def _write(src, out):
    n = sum(_copy(src, out, p) for p in FILES)
    n += sum(_copy(src, out, f"{MEMORY}/{a}") for a in ROOT_ATTRS)
    for i in block_indexes(src):
        d = f"{MEMORY}/memory{i}"
        n += sum(_copy(src, out, f"{d}/{a}") for a in BLOCK_ATTRS)
        for name in os.listdir(view_path(src, d)):
            if NODE_LINK.match(name):
                # the nodeN link is kept as a link (the readers need only its name; git keeps
                # links but not empty directories)
                link = view_path(src, f"{d}/{name}")
                target = os.readlink(link) if os.path.islink(link) else f"../../node/{name}"
                os.symlink(target, view_path(out, f"{d}/{name}"))
    if src == "/" and os.geteuid() == 0:
        seen = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "cat", IOMEM], capture_output=True, text=True, check=True).stdout
        with open(view_path(out, IOMEM_UNPRIVILEGED), "w") as f:
            f.write(seen)
        n += 1
    return n
