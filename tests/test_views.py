"""The readers on this machine's captured views, and on malformed inputs derived from them."""

import os
import re

import pytest
from hypothesis import given, strategies as st

from conftest import FIXTURES, HOST, edit
from observer.views import iomem, memory_blocks, zoneinfo
from observer.views.source import ViewError


def test_zoneinfo_reads_every_zone_including_empty_ones():
    zones = zoneinfo.read_zoneinfo(HOST)
    with open(f"{HOST}/proc/zoneinfo") as f:
        headers = re.findall(r"^Node (\d+), zone\s+(\S+)$", f.read(), re.M)
    assert [(str(z.node), z.name) for z in zones] == headers
    for z in zones:
        if z.present:
            assert z.start_pfn is not None and z.end_pfn == z.start_pfn + z.spanned
            assert z.managed <= z.present <= z.spanned
        else:  # the kernel prints no start_pfn for an unpopulated zone
            assert z.start_pfn is None and z.end_pfn is None


def test_zoneinfo_spans_do_not_overlap_and_cover_the_blocks():
    zones = [z for z in zoneinfo.read_zoneinfo(HOST) if z.present]
    for a, b in zip(zones, zones[1:]):
        assert a.end_pfn <= b.start_pfn
    blocks = memory_blocks.read_memory_blocks(HOST)
    pages_per_block = blocks.block_size // 4096
    last = max(b.index for b in blocks.blocks)
    assert zones[-1].end_pfn == (last + 1) * pages_per_block


def test_memory_blocks_match_the_directories():
    blocks = memory_blocks.read_memory_blocks(HOST)
    assert blocks.block_size == 128 << 20
    assert len(blocks.blocks) == 192
    assert all(b.state == "online" and b.node == 0 and b.removable for b in blocks.blocks)
    # block 0 holds DMA and DMA32: "none" since it spans two zones
    assert blocks.blocks[0].valid_zones == ("none",) and blocks.blocks[0].zone is None
    assert {b.zone for b in blocks.blocks[1:]} == {"DMA32", "Normal"}


def test_iomem_tree_keeps_nesting_and_system_ram_matches_blocks():
    roots = iomem.read_iomem(HOST)
    kernel_code = [r for r, p in iomem.walk(roots) if r.name == "Kernel code"]
    assert len(kernel_code) == 1
    parent = [p for r, p in iomem.walk(roots) if r is kernel_code[0]][0]
    assert parent.is_system_ram and parent.start <= kernel_code[0].start
    ram = sum(r.size for r, _ in iomem.walk(roots) if r.is_system_ram)
    blocks = memory_blocks.read_memory_blocks(HOST)
    # boot RAM has holes below 1 MiB; every other byte of System RAM is in a memory block
    assert 0 < len(blocks.blocks) * blocks.block_size - ram < 1 << 20


def test_iomem_read_without_privileges_is_detected():
    with open(f"{HOST}/proc/iomem.unprivileged") as f:
        text = f.read()
    with pytest.raises(ViewError, match="CAP_SYS_ADMIN"):
        iomem.parse_iomem(text, "iomem.unprivileged")


# Each case edits one line of the real capture; the error must point at that line (or, for a
# missing counter, at its zone's header, line 1 for DMA).
@pytest.mark.parametrize("relpath, old, new, message", [
    ("/proc/zoneinfo", "Node 0, zone   Normal", "Node x, zone   Normal", "zone header"),
    ("/proc/zoneinfo", "        spanned  4095", "        spanned  40x5", "not a number"),
    ("/proc/zoneinfo", "        managed  3840\n", "", "zone DMA of node 0 has no managed line"),
    ("/proc/zoneinfo", "        present  3998\n", "        present  3998\n        present  3998\n", "repeated"),
    ("/proc/iomem", "00100000-bfffffff : System RAM", "00100000 : System RAM", "start-end : name"),
    ("/proc/iomem", "  01000000-02209987 : Kernel code", "   01000000-02209987 : Kernel code", "odd indentation"),
    ("/proc/iomem", "  01000000-02209987 : Kernel code", "  c1000000-c2209987 : Kernel code", "not inside its parent"),
    ("/proc/iomem", "00100000-bfffffff : System RAM", "00100000-000fffff : System RAM", "before start"),
    ("/proc/iomem", "00100000-bfffffff : System RAM", "      00100000-bfffffff : System RAM", "nested"),
])
def test_malformed_view_names_file_and_line(host_copy, relpath, old, new, message):
    with open(f"{HOST}{relpath}") as f:
        original = f.read()
    line = 1 if new == "" else original[:original.index(old)].count("\n") + 1
    if "repeated" in message:
        line += 1
    path = edit(host_copy, relpath, old, new)
    readers = {"/proc/zoneinfo": zoneinfo.read_zoneinfo, "/proc/iomem": iomem.read_iomem}
    with pytest.raises(ViewError) as err:
        readers[relpath](str(host_copy))
    assert err.value.path == path and err.value.line == line
    assert message in err.value.message


@pytest.mark.parametrize("attr, value, message", [
    ("state", "half-online\n", "unknown state"),
    ("phys_index", "00000007\n", "does not match"),
    ("phys_index", "zz\n", "not a hex number"),
    ("valid_zones", "", "expected one line"),
    ("removable", "2\n", "expected 0 or 1"),
])
def test_malformed_block_names_the_file(host_copy, attr, value, message):
    path = host_copy / f"sys/devices/system/memory/memory5/{attr}"
    path.write_text(value)
    with pytest.raises(ViewError) as err:
        memory_blocks.read_memory_blocks(str(host_copy))
    assert err.value.path == str(path) and message in err.value.message


def test_line_numbers_count_newlines_only(host_copy):
    # a form feed is a line break to str.splitlines, not to the kernel or an editor
    path = edit(host_copy, "/proc/zoneinfo", "  pages free", "\f pages free")
    edit(host_copy, "/proc/zoneinfo", "        spanned  4095", "        spanned  40x5")
    with open(path) as f:
        line = f.read().split("\n").index("        spanned  40x5") + 1
    with pytest.raises(ViewError) as err:
        zoneinfo.read_zoneinfo(str(host_copy))
    assert err.value.line == line


def test_missing_view_is_one_clear_error(tmp_path):
    with pytest.raises(ViewError, match=r"proc/zoneinfo: missing"):
        zoneinfo.read_zoneinfo(str(tmp_path))


def test_a_block_removed_while_it_is_read_is_skipped(host_copy, monkeypatch):
    # hot-remove races a reconcile: memory5 is listed, then its directory goes before it is read
    import shutil
    real = memory_blocks.read_block

    def vanishing(root, index):
        if index == 5:
            shutil.rmtree(host_copy / "sys/devices/system/memory/memory5")
        return real(root, index)
    monkeypatch.setattr(memory_blocks, "read_block", vanishing)
    blocks = memory_blocks.read_memory_blocks(str(host_copy))
    assert len(blocks.blocks) == 191 and 5 not in {b.index for b in blocks.blocks}


blocks_drawn = st.dictionaries(st.integers(0, 60), st.tuples(
    st.sampled_from(["online", "offline"]), st.sampled_from(["Normal", "Movable", "none"]),
    st.integers(0, 1)), max_size=40)


@given(blocks_drawn, st.dictionaries(st.integers(0, 70), st.none() | st.tuples(
    st.sampled_from(["online", "offline"]), st.sampled_from(["Normal", "Movable", "none"]),
    st.integers(0, 1)), max_size=12))
def test_blocks_read_again_are_spliced_into_the_runs(before, changed):
    """A read that rereads some blocks (what uevents named) gives the runs, and each block's
    state, zone and node, that the whole read of the same blocks gives."""
    def block(i, drawn):
        state, zone, node = drawn
        return memory_blocks.MemoryBlock(i, state, (zone,) if state == "online" else
                                         ("Normal", "Movable"), node, None)
    now = dict(before)
    for i, drawn in changed.items():
        if drawn is None:
            now.pop(i, None)
        else:
            now[i] = drawn
    spliced = memory_blocks.MemoryBlocks(1 << 27, [block(i, before[i]) for i in sorted(before)]) \
        .with_blocks({i: d and block(i, d) for i, d in changed.items()}, None)
    whole = memory_blocks.MemoryBlocks(1 << 27, [block(i, now[i]) for i in sorted(now)])
    assert spliced.runs == whole.runs
    assert [(b.index, b.state, b.zone, b.node) for b in spliced.blocks] == \
        [(b.index, b.state, b.zone, b.node) for b in whole.blocks]


def test_a_block_being_added_is_not_asked_its_zones_before_it_has_a_node(tmp_path):
    """A block in the window between its uevent and its node link (lab-6.12's kmem capture,
    one offline block's links taken away, its valid_zones made unreadable): 5.10 oopsed on
    valid_zones there (NODE_DATA of no node), so it is not read until the link is in."""
    import shutil
    src = os.path.join(FIXTURES, "lab-6.12/kmem/03-system-ram")
    root = tmp_path / "root"
    shutil.copytree(src, root, symlinks=True)
    block = root / "sys/devices/system/memory/memory34"
    assert memory_blocks.read_block(str(root), 34).valid_zones    # linked: read as before
    (block / "node0").unlink()
    (root / "sys/devices/system/node/node0/memory34").unlink(missing_ok=True)
    (block / "valid_zones").unlink()
    (block / "valid_zones").mkdir()     # a read of it would fail
    read = memory_blocks.read_block(str(root), 34)
    assert (read.state, read.valid_zones, read.node) == ("offline", (), None)
