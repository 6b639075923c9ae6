"""Kernel addresses to "function [module]" names from /proc/kallsyms. bcc's own ksym() caches
kallsyms once, so modules loaded later (kmem, virtio_mem, loaded on demand) resolve to the wrong
neighbour; this table reloads whenever /proc/modules changes."""

import bisect


class Ksyms:
    def __init__(self, kallsyms="/proc/kallsyms", modules="/proc/modules"):
        self.kallsyms, self.modules = kallsyms, modules
        self.seen_modules = None
        self.addrs, self.names = [], []

    def _refresh(self):
        try:
            with open(self.modules) as f:
                mods = f.read()
        except FileNotFoundError:   # a kernel built without modules
            mods = ""
        if mods == self.seen_modules:
            return
        table = []
        with open(self.kallsyms) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in "tTwW":
                    module = parts[3].strip("[]") if len(parts) > 3 else "kernel"
                    table.append((int(parts[0], 16), f"{parts[2]} [{module}]"))
        table.sort()
        self.addrs = [a for a, _ in table]
        self.names = [n for _, n in table]
        self.seen_modules = mods

    def names_of(self, addrs):
        self._refresh()
        out = []
        for a in addrs:
            i = bisect.bisect_right(self.addrs, a) - 1
            out.append(self.names[i] if i >= 0 and self.addrs[i] else f"{a:#x}")
        return out
