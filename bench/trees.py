"""Sysfs-shaped trees for benchmarks and tests: the project's host capture grown to any number
of memory blocks, as a host with that much hot-added, onlined memory would show its views."""

import os
import shutil

# Captured from the project's dev host (Debian 12 userland, non-Debian 6.18 kernel, 24 GiB) with
# `memhp-observer capture -o tests/fixtures/host-6.18`.
HOST = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                    "fixtures", "host-6.18"))


def host_with_blocks(dst, total):
    """A copy of the host capture at dst, grown to `total` memory blocks."""
    shutil.copytree(HOST, dst, symlinks=True)
    return grow_blocks(dst, total)


def edit(root, relpath, old, new, count=1):
    """Replace old by new in one captured file; fails loudly if the capture has no such text."""
    path = os.path.join(root, relpath.lstrip("/"))
    with open(path) as f:
        text = f.read()
    if old not in text:
        raise ValueError(f"{old!r} not in {path}")
    with open(path, "w") as f:
        f.write(text.replace(old, new, count))
    return path


def grow_blocks(root, total):
    """Turn a copy of the host capture into a host with `total` memory blocks: blocks past the
    captured ones are added online in Normal, and zoneinfo and iomem grow to match, as they
    would after hot-adding and onlining that memory."""
    mem = os.path.join(root, "sys/devices/system/memory")
    have = sorted(int(n[6:]) for n in os.listdir(mem) if n.startswith("memory"))
    per_block = 128 << 20
    for i in range(have[-1] + 1, have[-1] + 1 + total - len(have)):
        d = os.path.join(mem, f"memory{i}")
        os.mkdir(d)
        for name, value in (("phys_index", f"{i:08x}"), ("state", "online"),
                            ("valid_zones", "Normal"), ("removable", "1")):
            with open(os.path.join(d, name), "w") as f:
                f.write(value + "\n")
        os.symlink("../../node/node0", os.path.join(d, "node0"))
    end = (have[-1] + 1 + total - len(have)) * per_block
    added = (total - len(have)) * per_block // 4096
    edit(root, "/proc/zoneinfo", "spanned  5505024", f"spanned  {5505024 + added}")
    edit(root, "/proc/zoneinfo", "present  5505024", f"present  {5505024 + added}")
    edit(root, "/proc/iomem", "100000000-63fffffff : System RAM", f"100000000-{end - 1:x} : System RAM")
    # the grown RAM reaches the 64-bit PCI window at 256 GiB: this host has none (resources
    # never overlap), so the window and what nests in it go
    iomem = os.path.join(root, "proc/iomem")
    with open(iomem) as f:
        lines = f.read().split("\n")
    window = lines.index("4000000000-7fffffffff : PCI Bus 0000:00")
    rest = next(i for i in range(window + 1, len(lines)) if not lines[i].startswith(" "))
    with open(iomem, "w") as f:
        f.write("\n".join(lines[:window] + lines[rest:]))
    return root
