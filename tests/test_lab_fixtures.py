"""Readers, snapshot and check on the views captured in the lab (tests/fixtures/lab-6.1 and
lab-6.12: every capture of one `memhp-observer lab` session on Debian 6.1 and on 6.12, the
conflict scenario in the same boot, copied from its results directory with its steps.jsonl and
traces), and on this host's capture."""

import glob
import json
import os

import pytest

from conftest import FIXTURES
from observer import formats, snapshot
from observer.model.invariants import judge_views
from observer.lab.scenarios import CONFLICT_ADDR, CONFLICT_SIZE
from observer.views import iomem

LABS = [os.path.join(FIXTURES, lab) for lab in ("lab-6.1", "lab-6.12")]
LAB = LABS[0]    # the kernel-specific facts below are 6.1's
CAPTURES = sorted(c for lab in LABS for c in glob.glob(os.path.join(lab, "*", "[0-9][0-9]-*"))) + \
    [os.path.join(FIXTURES, "host-6.18")]


def take(scenario, step):
    [path] = glob.glob(os.path.join(LAB, scenario, f"[0-9][0-9]-{step}"))
    return snapshot.take(path)


@pytest.mark.parametrize("lab", LABS, ids=os.path.basename)
def test_the_lab_fixtures_cover_every_scenario_step(lab):
    with open(os.path.join(lab, "steps.jsonl")) as f:
        recorded = [json.loads(l)["capture"] for l in f]
    lab_captures = [c for c in CAPTURES if c.startswith(lab + os.sep)]
    assert len(lab_captures) == len(recorded)
    assert all(os.path.isdir(os.path.join(lab, os.path.relpath(c, "captures"))) for c in recorded)


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: os.path.relpath(p, FIXTURES))
def test_snapshot_and_check_on_every_capture(path):
    snap = snapshot.take(path)
    doc = formats.snapshot_json(snap)
    assert doc["summary"]["blocks"] == len(snap.blocks.blocks) > 0
    assert doc["resources"] is not None and doc["iomem_error"] is None
    assert judge_views(snap, 0) == []


@pytest.mark.parametrize("lab", LABS, ids=os.path.basename)
def test_page_size_of_each_capture_is_the_guests(lab):
    # the guest's recorder wrote its sysconf page size into the trace header; the captures
    # do not record it, so the snapshot reads it off the views
    from observer.trace import read_trace
    header = next(read_trace(os.path.join(lab, "trace.jsonl")))
    sizes = {snapshot.take(c).page_size for c in CAPTURES if c.startswith(lab + os.sep)}
    assert sizes == {header["page_size"]}


def test_device_zone_spans_pages_it_never_shows_a_start_for():
    # ZONE_DEVICE pages are never present, so zoneinfo prints no start_pfn; the span stays
    # after the namespace is gone (never shrinks since 5.5). It runs from the first legacy pmem
    # range (4 GiB) to the end of the second: a raw legacy namespace is mapped too ("map mem")
    for step in ("fsdax", "devdax-raw"):
        dev = [z for z in take("fsdax", step).zones if z.name == "Device"][0]
        assert (dev.start_pfn, dev.present) == (None, 0)
        assert dev.spanned == (CONFLICT_ADDR + CONFLICT_SIZE - (4 << 30)) // 4096


def test_kmem_resource_tree():
    snap = take("kmem", "system-ram")
    [(ram, dax)] = [(r, p) for r, p in iomem.walk(snap.resources) if r.is_driver_managed]
    assert (ram.name, dax.name) == ("System RAM (kmem)", "dax0.0")
    [pmem] = [p for r, p in iomem.walk(snap.resources) if r is dax]
    assert pmem.name == "Persistent Memory (legacy)"
    types = {r["name"]: r["type"] for r in formats.hotplug_resources(snap.resources)}
    assert types["dax0.0"] == "driver_parent" and types["namespace0.0"] == "device"
    assert types["System RAM (kmem)"] == "system_ram_driver_managed"


def test_offline_hot_added_blocks_list_their_candidate_zones():
    snap = take("dimm", "added")
    new = [b for b in snap.blocks.blocks if b.state == "offline"]
    assert len(new) == 4 and all(b.valid_zones == ("Normal", "Movable") and b.zone is None for b in new)


def test_virtio_mem_device_region_is_a_driver_parent_even_when_empty():
    for step, children in (("grow", 1), ("shrink", 0)):
        snap = take("virtio-mem", step)
        [dev] = [r for r, p in iomem.walk(snap.resources) if p is None and r.name.startswith("virtio")]
        assert iomem.resource_type(dev, None) == "driver_parent" and len(dev.children) == children
