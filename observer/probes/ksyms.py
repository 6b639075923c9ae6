"""Kernel addresses to "function [module]" names from /proc/kallsyms. bcc's own ksym() caches
kallsyms once, so modules loaded later (kmem, virtio_mem, loaded on demand) resolve to the wrong
neighbour; this table reloads whenever a module is loaded, unloaded or goes live (its init
symbols go), not when a use count changes as devices come and go: parsing kallsyms takes
seconds under TCG.

Lookups are bounded by module: an address inside a module's memory (its base and size in
/proc/modules) is named only by that module's own symbols. Without the bound, the nearest symbol
below an address can belong to another module (a devdax stack once showed `nd_btt_init [nd_btt]`,
an init-only function of an unrelated module, between devm_create_dev_dax and dax_pmem_probe).
An address no symbol of its module explains is given as "0xADDR [module]"."""

import bisect
import re
import threading

# the kernel variables whose addresses the probes need: x86-64's vmemmap_base (KASLR moves it),
# from which a dump_page's pfn is read
VARIABLES = ("vmemmap_base",)
CLONE_SUFFIX = re.compile(r"(isra|constprop|part|cold)\.\d+")


def find_symbols(text, functions=()):
    """From kallsyms' text (bytes): (those of `functions` it has as text symbols by their own
    name, {function: its compiler copies (name.isra.0, name.constprop.0, name.part.0)} of those
    it has only so, {variable: address} of those of VARIABLES whose address it shows), each name
    looked for in the text: splitting all its 120,000 lines was most of a start's plan under TCG.
    Clones may drop or reorder arguments, and a .part is not the entry: they are never
    attached."""
    present, clones, addresses = set(), {}, {}
    for name in (*functions, *VARIABLES):
        needle = b" " + name.encode()
        at = text.find(needle)
        while at >= 0:
            # "ADDRESS TYPE NAME", then a newline, or a tab and the module
            line_end = text.find(b"\n", at) % (len(text) + 1)
            tab = text.find(b"\t", at, line_end)
            ends = tab if tab >= 0 else line_end
            start, at = at, text.find(needle, ends)
            symbol, suffix = text[start + 1:ends].decode(), text[start + 1 + len(needle) - 1:ends]
            if start < 2 or text[start - 2:start - 1] != b" " or suffix[:1] not in (b"", b"."):
                continue
            if name in VARIABLES:
                address = int(text[text.rfind(b"\n", 0, start) + 1:start - 2], 16)
                if not suffix and address:
                    addresses[name] = address
            elif text[start - 1:start] in (b"t", b"T", b"w", b"W"):
                if not suffix:
                    present.add(name)
                elif CLONE_SUFFIX.fullmatch(suffix[1:].decode()):
                    clones.setdefault(name, []).append(symbol)
    return present, {fn: sorted(c) for fn, c in clones.items() if fn not in present}, addresses


def parse_modules(text):
    """[(start, end, name)] from /proc/modules ("name size refcount deps state address ...").
    The range can over-reach (6.4+ prints the text base and the size of all the module's
    memory), so one address may lie in several: any of them may name it."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].startswith("0x"):
            base = int(parts[5], 16)
            if base:   # zero without CAP_SYSLOG: no bounds can be known
                out.append((base, base + int(parts[1]), parts[0]))
    return sorted(out)


class Ksyms:
    def __init__(self, kallsyms="/proc/kallsyms", modules="/proc/modules"):
        self.kallsyms, self.modules = kallsyms, modules
        self.seen_modules = None
        self.addrs, self.names, self.owners = [], [], []
        self.by_module = {}        # module -> ([addrs], [names])
        self.ranges = []
        self.core = (1, 0)         # lowest and highest address of the kernel's own text symbols
        self._lock = threading.Lock()   # one parse at a time: a lookup waits for one under way
        self._named = {}           # stack addresses -> their names, until the table changes
        self.variables = {}        # VARIABLES' addresses, from the first read
        self._read = threading.Event()   # kallsyms read (or the first parse failed)

    def load_soon(self):
        """Parse kallsyms now, in a thread of its own (while bcc compiles, which lets go of the
        GIL), so that the first event is not held up by the parse."""
        def load():
            try:
                self.names_of([])
            finally:
                self._read.set()
        threading.Thread(target=load, name="kallsyms", daemon=True).start()

    def variables_read(self):
        """VARIABLES' addresses, once load_soon's parse has read kallsyms: one read for both
        (reading /proc/kallsyms takes a good part of a second under TCG)."""
        self._read.wait()
        return self.variables

    def _refresh(self):
        try:
            with open(self.modules) as f:
                mods = f.read()
        except FileNotFoundError:   # a kernel built without modules
            mods = ""
        # name, size, state and address: not the use count and users between them
        loaded = [line.split()[:2] + line.split()[4:6] for line in mods.splitlines()]
        if loaded == self.seen_modules:
            return
        self._named = {}
        with open(self.kallsyms, "rb") as f:
            text = f.read()
        if not self._read.is_set():   # fixed for the boot: the first read's are kept
            self.variables = find_symbols(text)[2]
            self._read.set()
        table = []
        for line in text.decode().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tTwW":
                module = parts[3].strip("[]") if len(parts) > 3 else "kernel"
                table.append((int(parts[0], 16), parts[2], module))
        table.sort()
        self.addrs = [a for a, _, _ in table]
        self.names = [f"{n} [{m}]" for _, n, m in table]
        self.owners = [m for _, _, m in table]
        self.by_module = {}
        for a, n, m in table:
            addrs, names = self.by_module.setdefault(m, ([], []))
            addrs.append(a)
            names.append(f"{n} [{m}]")
        self.ranges = parse_modules(mods)
        core = [a for a, _, m in table if m == "kernel" and a]
        self.core = (min(core), max(core)) if core else (1, 0)
        self.seen_modules = loaded

    def _in_core(self, addr):
        """In the kernel's own text, where no module lies."""
        return self.core[0] <= addr <= self.core[1]

    def _modules_at(self, addr):
        return [name for start, end, name in self.ranges if start <= addr < end]

    def name_of(self, addr):
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0 or not self.addrs[i]:
            return f"{addr:#x}"
        inside = [] if self._in_core(addr) else self._modules_at(addr)
        if not inside or self.owners[i] in inside:
            return self.names[i]
        for module in inside:       # the nearest symbol of the module the address is in
            addrs, names = self.by_module.get(module, ([], []))
            j = bisect.bisect_right(addrs, addr) - 1
            if j >= 0:
                return names[j]
        return f"{addr:#x} [{inside[0]}]"

    def names_of(self, addrs):
        with self._lock:
            # a stack all in the kernel's own text needs no look at the modules (/proc/modules
            # was read for every event: 0.4-0.7 ms each in a 6.12 guest under TCG)
            if self.seen_modules is None or not all(map(self._in_core, addrs)):
                self._refresh()
            # the same few call paths come again and again: each is looked up once
            key = tuple(addrs)
            names = self._named.get(key)
            if names is None:
                if len(self._named) >= 4096:
                    self._named = {}
                names = self._named[key] = [self.name_of(a) for a in addrs]
            return names
