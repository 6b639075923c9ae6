"""check's invariants on the real host capture (clean) and on faults derived from it. Each fault
says what was changed in the capture; that a real kernel's leak is caught is shown in the lab."""

import os
import shutil

import pytest

from conftest import HOST, edit
from observer import snapshot
from observer.model.invariants import judge_views, span_leaks

MEM = "sys/devices/system/memory"
PAGE = 4096
PER_BLOCK = (128 << 20) // PAGE


def run(root):
    return judge_views(snapshot.take(str(root)), 0)


def kinds(anomalies):
    return sorted((a.kind, a.severity) for a in anomalies)


def set_block(root, index, state, zones):
    (root / MEM / f"memory{index}" / "state").write_text(state + "\n")
    (root / MEM / f"memory{index}" / "valid_zones").write_text(zones + "\n")


def test_this_machine_is_clean():
    assert run(HOST) == []


def test_offline_block_at_the_zone_edge_with_an_unshrunk_span_is_a_leak(host_copy):
    # memory199, the last block of Normal, offlined; zoneinfo left as it was (the kernel did not
    # shrink the span): Normal still reaches it
    set_block(host_copy, 199, "offline", "Normal Movable")
    [a] = run(host_copy)
    assert (a.kind, a.severity, a.node, a.zone) == ("zone_span_leak", "critical", 0, "Normal")
    assert (a.start_pfn, a.end_pfn) == (199 * PER_BLOCK, 200 * PER_BLOCK)
    assert any("memory199: state offline" in e for e in a.evidence)
    assert any(e.startswith("/proc/zoneinfo:") and "zone Normal" in e for e in a.evidence)


def test_offline_edge_block_with_the_span_shrunk_is_clean(host_copy):
    # the same offline, with Normal's spanned/present reduced by one block as 5.5+ kernels do
    set_block(host_copy, 199, "offline", "Normal Movable")
    edit(host_copy, "/proc/zoneinfo", "spanned  5505024", f"spanned  {5505024 - PER_BLOCK}")
    edit(host_copy, "/proc/zoneinfo", "present  5505024", f"present  {5505024 - PER_BLOCK}")
    assert run(host_copy) == []


def test_offline_block_in_the_middle_of_a_zone_is_not_a_leak(host_copy):
    # offlining never shrinks a span from the middle
    set_block(host_copy, 100, "offline", "Normal Movable")
    assert run(host_copy) == []


def test_block_moved_to_movable_at_the_edge_leaks_normal_span(host_copy):
    # memory199 onlined into Movable but Normal still spans it
    set_block(host_copy, 199, "online", "Movable")
    kinds_zones = [(a.kind, a.zone) for a in run(host_copy)]
    assert kinds_zones == [("zone_span_leak", "Normal")]


def test_empty_zone_that_still_spans_pages_is_a_leak(host_copy):
    # Movable: present 0 (so no start_pfn printed) but spanned left non-zero
    path = host_copy / "proc/zoneinfo"
    text = path.read_text()
    movable = text.index("zone  Movable")
    path.write_text(text[:movable] + text[movable:].replace("spanned  0", "spanned  32768", 1))
    [a] = run(host_copy)
    assert (a.kind, a.zone, a.start_pfn) == ("zone_span_leak", "Movable", None)


def test_hole_in_the_span_is_not_a_leak():
    # DMA32 spans to 4 GiB while its last block ends at 3 GiB (PCI hole): clean
    snap = snapshot.take(HOST)
    dma32 = [z for z in snap.zones if z.name == "DMA32"][0]
    last = max(b.index for b in snap.blocks.blocks if b.zone == "DMA32")
    assert dma32.end_pfn > (last + 1) * PER_BLOCK
    assert span_leaks(snap.zones, snap.blocks, PAGE, 0) == []


def test_removed_blocks_with_system_ram_left_is_a_resource_leak(host_copy):
    # memory192..199 removed (directories gone) and Normal shrunk, but iomem still has the
    # System RAM up to 0x63fffffff
    for i in range(192, 200):
        shutil.rmtree(host_copy / MEM / f"memory{i}")
    edit(host_copy, "/proc/zoneinfo", "spanned  5505024", f"spanned  {5505024 - 8 * PER_BLOCK}")
    edit(host_copy, "/proc/zoneinfo", "present  5505024", f"present  {5505024 - 8 * PER_BLOCK}")
    edit(host_copy, "/proc/iomem", "100000000-63fffffff : System RAM",
         "100000000-5ffffffff : System RAM\n600000000-63fffffff : System RAM (kmem)")
    [a] = run(host_copy)
    assert (a.kind, a.severity) == ("resource_leak", "critical")
    assert (a.start_pfn, a.end_pfn) == (0x600000000 // PAGE, 0x640000000 // PAGE)
    assert "System RAM (kmem)" in a.message and a.evidence[0].startswith("/proc/iomem:")


def test_online_block_without_system_ram_is_resource_missing(host_copy):
    # the last 1 GiB of System RAM cut from iomem; its 8 blocks stay online
    edit(host_copy, "/proc/iomem", "100000000-63fffffff : System RAM", "100000000-5ffffffff : System RAM")
    found = run(host_copy)
    assert kinds(found) == [("resource_missing", "critical")] * 8
    assert sorted(a.start_pfn // PER_BLOCK for a in found) == list(range(192, 200))


def test_driver_managed_ram_off_the_block_grid_is_unaligned(host_copy):
    # the top of boot RAM relabelled kmem, starting half-way into memory191
    edit(host_copy, "/proc/iomem", "100000000-63fffffff : System RAM",
         "100000000-5fbffffff : System RAM\n5fc000000-63fffffff : System RAM (kmem)")
    assert kinds(run(host_copy)) == [("unaligned_operation", "warning")]


def test_aligned_driver_managed_ram_is_clean(host_copy):
    edit(host_copy, "/proc/iomem", "100000000-63fffffff : System RAM",
         "100000000-5ffffffff : System RAM\n600000000-63fffffff : System RAM (kmem)")
    assert run(host_copy) == []


def test_without_iomem_only_the_zone_rules_judge(host_copy):
    # memory199 offlined with Normal unshrunk (a span leak), and System RAM above it with no
    # block under it (a resource leak); read as if without CAP_SYS_ADMIN: only the span leak shows
    set_block(host_copy, 199, "offline", "Normal Movable")
    edit(host_copy, "/proc/iomem", "100000000-63fffffff : System RAM",
         "100000000-63fffffff : System RAM\n640000000-647ffffff : System RAM")
    snap = snapshot.take(str(host_copy))
    assert {a.kind for a in judge_views(snap, 0)} >= {"zone_span_leak", "resource_leak"}
    snap = snap._replace(resources=None, iomem_error="no privileges")
    assert [a.kind for a in judge_views(snap, 0)] == ["zone_span_leak"]
