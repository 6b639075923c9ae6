"""Corrupted kernel-view trees, derived from real captures, for the bad-input campaign
(test_bad_input.py). A variant is (family, name, expect, mutate): `mutate(root)` damages a copy
of the capture; `expect` is "error" when no kernel could have written the result (snapshot and
check must then exit 2 naming the file), "any" when it may still be a real kernel's state."""

import os
import random
import re

ZONEINFO, IOMEM = "proc/zoneinfo", "proc/iomem"
MEM = "sys/devices/system/memory"
BLOCK_SIZE = f"{MEM}/block_size_bytes"


def read(root, rel):
    with open(os.path.join(root, rel), "rb") as f:
        return f.read()


def write(root, rel, data):
    path = os.path.join(root, rel)
    if os.path.lexists(path) and not os.path.isfile(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def replace(root, rel, pattern, repl, count=1):
    text = read(root, rel).decode()
    new, n = re.subn(pattern, repl, text, count=count, flags=re.M)
    assert n, f"{pattern!r} not in {rel} of {root}"
    write(root, rel, new)


def blocks(root):
    return sorted(int(n[6:]) for n in os.listdir(os.path.join(root, MEM)) if re.fullmatch(r"memory\d+", n))


def last_block(root):
    return f"{MEM}/memory{blocks(root)[-1]}"


def populated_zone(root):
    """The name of the last zone with present pages (it has a start_pfn line)."""
    text = read(root, ZONEINFO).decode()
    zones = re.findall(r"^Node \d+, zone\s+(\S+)\n(?:(?!Node ).*\n)*?\s+present\s+([1-9]\d*)$", text, re.M)
    return zones[-1][0]


def zone_section(text, name):
    """(start, end) offsets of one zone's lines in zoneinfo text."""
    m = re.search(rf"^Node \d+, zone\s+{name}$", text, re.M)
    nxt = re.search(r"^Node ", text[m.end():], re.M)
    return m.start(), m.end() + nxt.start() if nxt else len(text)


def set_counter(root, counter, value):
    """Set a counter of the last populated zone."""
    text = read(root, ZONEINFO).decode()
    start, end = zone_section(text, populated_zone(root))
    section = re.sub(rf"^(\s+{counter}\s+)\d+$", rf"\g<1>{value}", text[start:end], count=1, flags=re.M)
    write(root, ZONEINFO, text[:start] + section + text[end:])


def truncate(rel, fraction):
    def mutate(root):
        data = read(root, rel.replace("LAST", last_block(root)))
        write(root, rel.replace("LAST", last_block(root)), data[:int(len(data) * fraction)])
    return mutate


def flip(rel, seed):
    def mutate(root):
        rng = random.Random(seed)
        data = bytearray(read(root, rel))
        data[rng.randrange(len(data))] = rng.randrange(256)
        write(root, rel, bytes(data))
    return mutate


def fifo(rel):
    def mutate(root):
        path = os.path.join(root, rel.replace("LAST", last_block(root)))
        os.unlink(path)
        os.mkfifo(path)
    return mutate


def link(rel, target):
    def mutate(root):
        path = os.path.join(root, rel.replace("LAST", last_block(root)))
        os.unlink(path)
        os.symlink(target, path)
    return mutate


def as_directory(rel):
    def mutate(root):
        path = os.path.join(root, rel)
        os.unlink(path)
        os.mkdir(path)
    return mutate


def sparse(rel, size):
    def mutate(root):
        with open(os.path.join(root, rel), "r+b") as f:
            f.truncate(size)
    return mutate


def long_line(root):
    text = read(root, ZONEINFO).decode()
    write(root, ZONEINFO, text.replace("spanned", "spanned " + "9" * (2 << 20) + " x", 1))


def form_feed_then_bad_number(root):
    # a form feed early in the file, a bad number later: the error's line number must still be
    # the line's number in the file (split on newlines only)
    text = read(root, ZONEINFO).decode()
    text = text.replace("\n", "\n\f", 1)
    write(root, ZONEINFO, text.replace("managed", "managed x", 1))


def duplicate_zone(node):
    def mutate(root):
        text = read(root, ZONEINFO).decode()
        start, end = zone_section(text, populated_zone(root))
        copy = re.sub(r"^Node \d+", f"Node {node}", text[start:end], count=1)
        write(root, ZONEINFO, text + ("" if text.endswith("\n") else "\n") + copy)
    return mutate


def drop_start_pfn(root):
    text = read(root, ZONEINFO).decode()
    start, end = zone_section(text, populated_zone(root))
    write(root, ZONEINFO, text[:start] + re.sub(r"^\s+start_pfn:.*\n", "", text[start:end], flags=re.M)
          + text[end:])


def start_pfn_in_empty_zone(root):
    text = read(root, ZONEINFO).decode()
    m = re.search(r"^(\s+present\s+0\n(?:.*\n)*?\s+protection: .*\n)", text, re.M)
    assert m, "no unpopulated zone"
    write(root, ZONEINFO, text[:m.end()] + "  start_pfn:           4096\n" + text[m.end():])


def system_ram_lines(root):
    return [l for l in read(root, IOMEM).decode().split("\n") if re.match(r"^[0-9a-f]+-[0-9a-f]+ : System RAM", l)]


def duplicate_system_ram(root):
    line = system_ram_lines(root)[-1]
    replace(root, IOMEM, "^" + re.escape(line) + "$", line + "\n" + line)


def overlap_system_ram(root):
    first, last = system_ram_lines(root)[0], system_ram_lines(root)[-1]
    end = first.split("-")[1].split()[0]
    start = last.split("-")[0]
    replace(root, IOMEM, "^" + re.escape(last) + "$", last.replace(start, end, 1))


def ram_to_the_top(root):
    # the last top-level resource extended to the end of the 64-bit space: legal, and the rules
    # must cost what the file holds, not what the numbers say
    lines = read(root, IOMEM).decode().rstrip("\n").split("\n")
    top = [l for l in lines if not l.startswith(" ")][-1]
    start = int(top.split("-")[0], 16)
    end = int(top.split("-")[1].split()[0], 16)
    write(root, IOMEM, "\n".join(lines) + f"\n{max(end + 1, start) + (1 << 40):x}-ffffffffffffffff : System RAM\n")


def address_wider_than_64_bits(root):
    line = system_ram_lines(root)[-1]
    replace(root, IOMEM, "^" + re.escape(line) + "$", re.sub(r"-[0-9a-f]+ ", "-1ffffffffffffffff ", line, 1))


def nested(depth):
    def mutate(root):
        line = system_ram_lines(root)[-1]
        start, end = (int(x, 16) for x in re.match(r"([0-9a-f]+)-([0-9a-f]+)", line).groups())
        extra = "\n".join(f"{'  ' * d}{start:x}-{end:x} : level {d}" for d in range(1, depth + 1))
        replace(root, IOMEM, "^" + re.escape(line) + "$", line + "\n" + extra)
    return mutate


def child_outside_parent(root):
    text = read(root, IOMEM).decode()
    m = re.search(r"^  ([0-9a-f]+)-([0-9a-f]+) : Kernel code$", text, re.M)
    write(root, IOMEM, text[:m.start()] + "  ffffffff0-ffffffff1 : Kernel code" + text[m.end():])


def block_copied_as(name):
    """A copy of the last block under another name (memory0078: the kernel never pads)."""
    def mutate(root):
        import shutil
        src = os.path.join(root, last_block(root))
        shutil.copytree(src, os.path.join(root, MEM, name.format(n=blocks(root)[-1])), symlinks=True)
    return mutate


def block_renamed(fmt):
    def mutate(root):
        n = blocks(root)[-1]
        os.rename(os.path.join(root, MEM, f"memory{n}"), os.path.join(root, MEM, fmt.format(n=n)))
    return mutate


def block_as_file(root):
    write(root, f"{MEM}/memory{blocks(root)[-1] + 1}", "0\n")


def block_symlink_loop(root):
    n = blocks(root)[-1] + 1
    os.symlink(f"memory{n}", os.path.join(root, MEM, f"memory{n}"))


def node_link(name):
    def mutate(root):
        d = os.path.join(root, last_block(root))
        for old in [x for x in os.listdir(d) if x.startswith("node")]:
            os.unlink(os.path.join(d, old))
        os.symlink(f"../../node/{name}", os.path.join(d, name))
    return mutate


def attr(name, value):
    def mutate(root):
        write(root, f"{last_block(root)}/{name}", value)
    return mutate


def remove(rel):
    def mutate(root):
        os.unlink(os.path.join(root, rel.replace("LAST", last_block(root))))
    return mutate


def variants(seed=0):
    """Every variant of every family, for one capture."""
    out = []
    add = lambda family, name, expect, fn: out.append((family, name, expect, fn))  # noqa: E731
    for rel in (ZONEINFO, IOMEM, BLOCK_SIZE, "LAST/state", "LAST/phys_index", "LAST/valid_zones"):
        for fraction in (0, 0.02, 0.35, 0.5, 0.97):
            add("truncated", f"{rel} cut at {fraction:.0%}", "any", truncate(rel, fraction))
    for i in range(12):
        add("byte flip", f"zoneinfo #{i}", "any", flip(ZONEINFO, seed * 100 + i))
        add("byte flip", f"iomem #{i}", "any", flip(IOMEM, seed * 100 + 50 + i))
    for counter in ("spanned", "present", "managed"):
        for value, expect in (("-1", "error"), (str(1 << 64), "error"), (str(1 << 70), "error"),
                              ("+5", "error"), ("1_0", "error"), (str(1 << 60), "any")):
            if counter == "present" and value == str(1 << 60):
                expect = "error"       # present above spanned
            add("numbers", f"{counter} {value}", expect, lambda r, c=counter, v=value: set_counter(r, c, v))
    add("numbers", "present above spanned", "error",
        lambda r: (set_counter(r, "spanned", 10), set_counter(r, "present", 11), set_counter(r, "managed", 11)))
    add("numbers", "managed above present (legal mid-online)", "any", lambda r: set_counter(r, "managed", 1 << 40))
    for value, expect in (("320", "error"), ("1", "error"), ("8", "error"), ("0", "error"),
                          ("8000001", "error"), ("-8000000", "error"), ("8000000000000000", "any"),
                          ("0x8000000", "error"), ("8000000\n8000000", "error")):
        add("numbers", f"block_size_bytes {value!r}", expect, lambda r, v=value: write(r, BLOCK_SIZE, v + "\n"))
    add("numbers", "phys_index of 80 bits", "error", attr("phys_index", "f" * 20 + "\n"))
    add("numbers", "System RAM to ffffffffffffffff", "any", ram_to_the_top)
    add("numbers", "address wider than 64 bits", "error", address_wider_than_64_bits)
    add("zones", "duplicated zone", "error", duplicate_zone(0))
    add("zones", "the zone again on node 1", "any", duplicate_zone(1))
    add("zones", "node 99999999999999999999", "error", duplicate_zone(99999999999999999999))
    add("zones", "populated zone without start_pfn", "error", drop_start_pfn)
    add("zones", "empty zone with a start_pfn", "error", start_pfn_in_empty_zone)
    add("zones", "zone Bogus", "error", lambda r: replace(r, ZONEINFO, r"^Node 0, zone\s+DMA$", "Node 0, zone    Bogus"))
    add("zones", "form feed, then a bad number", "error", form_feed_then_bad_number)
    add("zones", "a 2 MiB line", "error", long_line)
    add("iomem", "duplicated System RAM", "error", duplicate_system_ram)
    add("iomem", "overlapping System RAM", "error", overlap_system_ram)
    add("iomem", "child outside its parent", "error", child_outside_parent)
    add("iomem", "1200 nested lines", "error", nested(1200))
    add("iomem", "6 nested lines", "error", nested(6))
    add("iomem", "5 nested lines (the kernel's deepest)", "any", nested(5))
    add("block names", "memory0078 beside memory78", "error", block_copied_as("memory00{n}"))
    add("block names", "memory0N instead of memoryN", "error", block_renamed("memory0{n}"))
    add("block names", "non-ASCII digits", "error", block_renamed("memory\u0667{n}"))
    add("block names", "memory-1", "error", block_copied_as("memory-1"))
    add("block names", "memoryx", "error", block_copied_as("memoryx"))
    add("block names", "a block that is a file", "error", block_as_file)
    add("block names", "a block that is a symlink loop", "error", block_symlink_loop)
    add("block names", "a block without attributes", "error",
        lambda r: os.mkdir(os.path.join(r, MEM, f"memory{blocks(r)[-1] + 100}")))
    add("block attrs", "valid_zones Bogus", "error", attr("valid_zones", "Bogus\n"))
    add("block attrs", "state half-online", "error", attr("state", "half-online\n"))
    add("block attrs", "state going-offline", "any", attr("state", "going-offline\n"))
    add("block attrs", "removable missing", "any", remove("LAST/removable"))
    add("block attrs", "phys_index missing", "error", remove("LAST/phys_index"))
    add("block attrs", "node 99999999999999999999", "error", node_link("node99999999999999999999"))
    add("block attrs", "node 1023", "any", node_link("node1023"))
    add("block attrs", "node01", "any", node_link("node01"))   # not a node link: no node known
    for rel in (ZONEINFO, IOMEM, BLOCK_SIZE, "LAST/state"):
        add("special files", f"FIFO for {rel}", "error", fifo(rel))
        add("special files", f"{rel} -> /dev/zero", "error", link(rel, "/dev/zero"))
    add("special files", "zoneinfo -> /dev/null", "error", link(ZONEINFO, "/dev/null"))
    add("special files", "zoneinfo a directory", "error", as_directory(ZONEINFO))
    add("special files", "zoneinfo of 65 MiB", "error", sparse(ZONEINFO, 65 << 20))
    add("special files", "state of 70 KiB", "error", sparse(f"{MEM}/memory0/state", 70 << 10))
    add("special files", "zoneinfo a dangling link", "error", link(ZONEINFO, "/nonexistent/zoneinfo"))
    add("missing", "no zoneinfo", "error", remove(ZONEINFO))
    add("missing", "no block_size_bytes", "error", remove(BLOCK_SIZE))
    add("missing", "no iomem", "error", remove(IOMEM))
    return out
