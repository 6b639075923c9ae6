"""The reference model on traces recorded in the lab (tests/fixtures/lab-*/trace*.jsonl) and on
traces written from lab captures: a healthy kernel's trace is judged clean, and the same real
trace with one kernel step taken out (a shrink, a release, a present-page count, a remove done
twice) is caught where it happened. The evidence is always the kernel's: its views in the
trace's snapshots, or the capture the snapshot came from."""

import copy
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import FIXTURES
from observer import formats, snapshot
from observer.model.anomaly import CRITICAL
from observer.model.invariants import judge_views
from observer.model.model import Model
from observer.pipeline import replay
from observer.sources.live import LiveSource

EXE = os.path.join(os.path.dirname(sys.executable), "memhp-observer")
TRACES = sorted(glob.glob(os.path.join(FIXTURES, "lab-*", "trace*.jsonl")))
BPF_TRACES = [t for t in TRACES if not t.endswith("procfs.jsonl")]


def _offline_names_its_zone(path):
    # offline_pages takes the zone since 5.17: 5.10's events carry neither zone nor span
    with open(path) as f:
        return "struct zone *" in json.loads(f.readline())["probes"]["offline_pages"]["shape"]


SPAN_TRACES = [t for t in BPF_TRACES if _offline_names_its_zone(t)]


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def judge(records):
    model = Model()
    found = []
    for rec in records:
        found += model.feed(rec)
    return found + model.finish(), model


def kinds(found, severity=None):
    return sorted({a.kind for a in found if severity is None or a.severity == severity})


def events(records, fn, ok=True):
    return [i for i, r in enumerate(records) if r["type"] == "event" and r["fn"] == fn
            and (not ok or r["ret"] in (0, "ok", None))]


@pytest.mark.parametrize("path", TRACES, ids=lambda p: os.path.relpath(p, FIXTURES))
def test_every_lab_trace_is_judged_clean(path):
    found, model = replay(path)
    assert not [a for a in found if a.severity == CRITICAL], [a.message for a in found]
    assert "model_drift" not in kinds(found)
    if path in BPF_TRACES:
        # the events put every block where the kernel's views show it, at every settled read
        assert model.snapshots["judged"] >= 5
        last = [r for r in load(path) if r["type"] == "snapshot"][-1]
        assert formats.block_ranges(model.judged.blocks) == last["memory_blocks"]


def test_a_read_while_a_block_goes_offline_is_not_judged():
    """6.12's trace holds a snapshot read while block 40 was going-offline at the start of
    Movable: the view rules alone call that a span leak; the model waits for the offline."""
    path = os.path.join(FIXTURES, "lab-6.12", "trace.jsonl")
    records = load(path)
    header = records[0]
    [going] = [r for r in records if r["type"] == "snapshot"
               and any(b["state"] == "going-offline" for b in r["memory_blocks"])]
    alone = judge_views(formats.snapshot_from_record(going, header), going["ts_ns"])
    assert kinds(alone, CRITICAL) == ["zone_span_leak"]
    model, found, unsettled = Model(), [], []
    for rec in records:
        before = model.snapshots["unsettled"]
        found += model.feed(rec)
        if model.snapshots["unsettled"] > before:
            unsettled.append(model.last_unsettled)
    assert not kinds(found, CRITICAL)
    assert any(why.endswith("is going-offline") for why in unsettled)


@pytest.mark.parametrize("path", BPF_TRACES, ids=lambda p: os.path.relpath(p, FIXTURES))
def test_an_online_the_events_missed_is_drift_on_that_block(path):
    records = load(path)
    i = events(records, "online_pages")[-1]
    onlined = records[i]
    found, _ = judge(records[:i] + records[i + 1:])
    [drift] = [a for a in found if a.kind == "model_drift"]
    block = onlined["start_pfn"] * 4096 // records[0]["block_size"]
    assert f"memory{block}:" in drift.evidence[0]


@pytest.mark.parametrize("path", SPAN_TRACES, ids=lambda p: os.path.relpath(p, FIXTURES))
def test_an_offline_at_a_zone_edge_that_left_the_span_is_a_leak(path):
    records = copy.deepcopy(load(path))
    shrunk = [i for i in events(records, "offline_pages")
              if records[i]["span_before"]["start_pfn"] != records[i]["span_after"]["start_pfn"]]
    e = records[shrunk[0]]
    e["span_after"] = dict(e["span_before"], present=e["span_after"]["present"])
    found, _ = judge(records)
    [leak] = [a for a in found if a.kind == "zone_span_leak"]
    assert (leak.node, leak.zone, leak.start_pfn, leak.end_pfn) == \
        (e["nid"], e["zone"], e["start_pfn"], e["start_pfn"] + e["nr_pages"])
    assert leak.severity == CRITICAL and f"seq {e['seq']}" in leak.evidence[0]


def test_present_pages_that_moved_by_other_than_the_onlined_pages():
    records = copy.deepcopy(load(os.path.join(FIXTURES, "lab-6.1", "trace.jsonl")))
    e = records[events(records, "online_pages")[0]]
    e["span_after"]["present"] += 512
    found, _ = judge(records)
    [a] = [a for a in found if a.kind == "present_pages_mismatch"]
    assert (a.zone, a.start_pfn) == (e["zone"], e["start_pfn"]) and "+" in a.message


def test_a_remove_done_twice_is_unbalanced():
    records = load(os.path.join(FIXTURES, "lab-6.1", "trace.jsonl"))
    i = events(records, "__remove_pages")[-1]
    again = dict(records[i], ts_ns=records[-1]["ts_ns"] + 1, seq=10 ** 6)
    found, _ = judge(records + [again])
    [a] = [a for a in found if a.kind == "unbalanced_remove"]
    assert a.start_pfn == again["start_pfn"] and "already removed" in a.message


def test_a_release_over_a_live_pagemap_is_a_device_range_release():
    records = load(os.path.join(FIXTURES, "lab-6.1", "trace.jsonl"))
    mapped = records[events(records, "memremap_pages")[-1]]   # stays mapped to the end
    lo, hi = mapped["pgmap"]["ranges"][0]
    release = dict(records[events(records, "release_mem_region_adjustable")[-1]],
                   ts_ns=records[-1]["ts_ns"] + 1, seq=10 ** 6, start=lo, size=hi + 1 - lo,
                   start_pfn=lo // 4096, nr_pages=(hi + 1 - lo) // 4096)
    found, _ = judge(records + [release])
    [a] = [a for a in found if a.kind == "device_range_release"]
    assert (a.start_pfn, a.end_pfn, a.severity) == (lo // 4096, (hi + 1) // 4096, "warning")


def test_a_pagemap_whose_owner_went_is_a_leak():
    records = copy.deepcopy(load(os.path.join(FIXTURES, "lab-6.1", "trace.jsonl")))
    mapped = records[events(records, "memremap_pages")[-1]]
    lo, hi = mapped["pgmap"]["ranges"][0]
    last = records[-1]
    assert last["type"] == "snapshot"
    last["resources"] = [r for r in last["resources"] if not (r["start"] <= lo and hi <= r["end"])]
    found, _ = judge(records)
    [a] = [a for a in found if a.kind == "pagemap_leak"]
    assert (a.start_pfn, a.end_pfn, a.severity) == (lo // 4096, (hi + 1) // 4096, CRITICAL)


def test_an_offline_refused_says_the_page_the_kernel_named():
    """lab-6.1-busy: a 6.1 guest's selftest scenario, whose offline-busy step printed the
    kernel's dump_page lines. The operation_failed of the refused offline names that pfn and
    reason; without the annotation it says the kernel named no page."""
    import re
    lab = os.path.join(FIXTURES, "lab-6.1-busy")
    [busy] = [r for r in load(os.path.join(lab, "steps.jsonl")) if r["step"] == "offline-busy"]
    pfn = int(re.findall(r"pfn:(0x[0-9a-f]+)", busy["out"])[-1], 16)
    reason = re.findall(r"page dumped because: (.*)", busy["out"])[-1].strip()
    records = copy.deepcopy(load(os.path.join(lab, "trace.jsonl")))
    found, _ = judge(records)
    [a] = [a for a in found if a.kind == "operation_failed" and "-EBUSY" in a.message]
    assert f"the kernel named pfn {pfn:#x} ('{reason}'; flags reserved;" in a.message
    assert a.start_pfn <= pfn < a.end_pfn and a.severity == "info"
    [refused] = [r for r in records if r.get("fn") == "offline_pages" and r["ret"] == -16]
    del refused["blocked_by"]
    found, _ = judge(records)
    [a] = [a for a in found if a.kind == "operation_failed" and "-EBUSY" in a.message]
    assert "the kernel named no page" in a.message


def test_a_5_10_trace_whose_events_name_no_zone_nor_pgmap_is_followed_without_drift():
    """lab-5.10: every scenario in a Debian 5.10 guest (its kprobe trace, recorded before the
    model knew 5.10). There online_pages and offline_pages take no zone and arch_add_memory's
    mhp_params no pgmap, so the events say neither; the model follows every block through them
    (its block states meet every settled read of the views: no model_drift) and, for a
    ZONE_DEVICE add, takes the memremap_pages call around it. Nothing above info (the model
    before this took those adds for System RAM and said model_drift)."""
    records = load(os.path.join(FIXTURES, "lab-5.10", "trace.jsonl"))
    probes = records[0]["probes"]
    assert "zone" not in probes["online_pages"]["shape"] and "zone" not in probes["offline_pages"]["shape"]
    assert "pgmap" not in probes["arch_add_memory"]["shape"] + probes["__remove_pages"]["shape"]
    onlined = [r for r in records if r.get("fn") == "online_pages" and r["ret"] == 0]
    assert len(onlined) > 20 and all(r.get("zone") is None for r in onlined)
    found, model = judge(records)
    assert [a for a in found if a.severity != "info"] == []
    assert model.snapshots["judged"] > 100


def test_a_5_10_add_inside_a_pagemap_call_still_running_is_zone_device():
    """lab-5.10-begun: a 5.10 BPF daemon's record (a CI run). devdax's memremap_pages was still
    running when the daemon read the views, so it is written `begun` (its pgmap, read at return,
    not yet known) and its arch_add_memory comes before its event. 5.10's mhp_params carries no
    pgmap: the memremap_pages the same thread is in is what says ZONE_DEVICE. Taken for System
    RAM, the four blocks were expected offline, and the next read said model_drift."""
    records = load(os.path.join(FIXTURES, "lab-5.10-begun", "trace.jsonl"))
    [begun] = [r for r in records if r["type"] == "begun" and r["fn"] == "memremap_pages"]
    [add] = [r for r in records if r.get("fn") == "arch_add_memory" and r["tid"] == begun["tid"]
             and r["seq"] > begun["seq"]]
    [ended] = [i for i, r in enumerate(records) if r["type"] == "event" and r["seq"] == begun["seq"]]
    assert records.index(begun) < records.index(add) < ended
    found, _ = judge(records)
    assert [a.message for a in found if a.severity != "info"] == []


# --- procfs-mode traces written from lab captures ---------------------------------------------

def procfs_trace(path, roots):
    """A procfs-mode trace of snapshots of these capture trees, 10 s apart, written with the
    recorder's own writers."""
    source = LiveSource(root=roots[0])
    first = snapshot.take(roots[0])
    lines = [source.header(first)]
    for i, root in enumerate(roots):
        t = lines[0]["start_monotonic_ns"] + (i + 1) * 10 ** 10
        lines.append(formats.snapshot_record(snapshot.take(root), t, t + 10 ** 6, 0))
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    return path


def capture(name, step):
    return os.path.join(FIXTURES, "lab-6.1", name, step)


def removed_without_release(tmp_path):
    """virtio-mem grown to 8 blocks, then 7 of them removed by a kernel that released neither
    their part of the merged "System RAM (virtio_mem)" nor Movable's span over them."""
    tree = tmp_path / "leaky"
    shutil.copytree(capture("virtio-mem", "02-grow"), tree, symlinks=True)
    blocks = tree / "sys/devices/system/memory"
    grown = sorted(int(d.name[6:]) for d in blocks.glob("memory*")
                   if d.name[6:].isdigit() and int(d.name[6:]) >= 48)
    for index in grown[1:]:
        shutil.rmtree(blocks / f"memory{index}")
    return str(tree), grown


def test_a_merged_resource_left_over_removed_blocks_is_a_partial_leak(tmp_path):
    leaky, grown = removed_without_release(tmp_path)
    grow = capture("virtio-mem", "02-grow")
    path = procfs_trace(tmp_path / "t.jsonl", [capture("virtio-mem", "00-start")] * 2
                        + [grow, grow, leaky, leaky])
    found, model = replay(path)
    per_block = 134217728 // 4096
    gone = (grown[1] * per_block, (grown[-1] + 1) * per_block)
    leak = [a for a in found if a.kind == "resource_leak"]
    assert [(a.start_pfn, a.end_pfn) for a in leak] == [gone]
    assert "System RAM (virtio_mem)" in leak[0].message
    span = [a for a in found if a.kind == "zone_span_leak"]
    assert [(a.zone, a.start_pfn, a.end_pfn) for a in span] == [("Movable",) + gone]
    # the view rules alone see neither: a block is still under the resource, the edge is a "hole"
    assert not judge_views(snapshot.take(leaky), 0)


def test_procfs_mode_judges_only_two_reads_that_agree(tmp_path):
    leaky, _ = removed_without_release(tmp_path)
    grow = capture("virtio-mem", "02-grow")
    path = procfs_trace(tmp_path / "t.jsonl", [capture("virtio-mem", "00-start")] * 2
                        + [grow, grow, leaky])
    found, model = replay(path)
    assert not found and model.snapshots == {"judged": 2, "unsettled": 3}


# --- the verb ---------------------------------------------------------------------------------

def run_replay(*args):
    return subprocess.run([EXE, "replay", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_replay_exit_status_says_clean_critical_or_unreadable(tmp_path):
    clean = run_replay(os.path.join(FIXTURES, "lab-6.1", "trace.jsonl"))
    assert clean.returncode == 0, clean.stderr
    assert "0 critical" in clean.stdout and "5 snapshots judged" in clean.stdout

    leaky, _ = removed_without_release(tmp_path)
    grow = capture("virtio-mem", "02-grow")
    trace = procfs_trace(tmp_path / "t.jsonl", [capture("virtio-mem", "00-start")] * 2
                         + [grow, grow, leaky, leaky])
    critical = run_replay(trace, "--json")
    assert critical.returncode == 1, critical.stderr
    doc = json.loads(critical.stdout)
    assert {a["kind"] for a in doc["anomalies"]} == {"resource_leak", "zone_span_leak"}

    records = load(os.path.join(FIXTURES, "lab-6.1", "trace.jsonl"))
    i = events(records, "online_pages")[0]
    records[i]["nr_pages"] = "all"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    unreadable = run_replay(bad)
    assert unreadable.returncode == 2
    assert unreadable.stderr.startswith(f"memhp-observer replay: {bad}:{i + 1}: event record")
    assert "Traceback" not in unreadable.stderr


# --- the range set against a set of pfns --------------------------------------------------------

from hypothesis import given, strategies as st   # noqa: E402

from observer.model.ranges import BlockMap, RangeMap, RangeSet   # noqa: E402

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(0, 12)), max_size=40)


@given(ops, st.integers(0, 70), st.integers(0, 12))
def test_range_set_holds_what_a_set_of_pfns_holds(steps, lo, n):
    ranges, pfns = RangeSet(), set()
    for add, a, k in steps:
        (ranges.add if add else ranges.remove)(a, a + k)
        (pfns.update if add else pfns.difference_update)(range(a, a + k))
    assert {p for a, b in ranges for p in range(a, b)} == pfns
    assert all(b < c for (_, b), (c, _) in zip(list(ranges), list(ranges)[1:]))  # merged
    inside = pfns & set(range(lo, lo + n))
    assert {p for a, b in ranges.overlap(lo, lo + n) for p in range(a, b)} == inside
    assert ranges.covers(lo, lo + n) == (len(inside) == n)
    held = ranges.range_at(lo)
    assert (held is not None) == (lo in pfns) and (held is None or held[0] <= lo < held[1])
    assert {p for a, b in ranges.gaps(lo, lo + n) for p in range(a, b)} == \
        set(range(lo, lo + n)) - pfns


map_ops = st.lists(st.tuples(st.sampled_from("acf"), st.integers(0, 60), st.integers(0, 12),
                             st.sampled_from("xyz")), max_size=40)


@pytest.mark.parametrize("kind", [RangeMap, BlockMap])
@given(steps=map_ops, others=map_ops)
def test_range_map_holds_what_a_dict_of_blocks_holds(kind, steps, others):
    """assign, clear and fill (what events do to the blocks the model expects), and diff
    against another map, as a dict of block index -> value does them; a BlockMap's one-block
    notes still untaken when diff is asked."""
    maps = []
    for ops in (steps, others):
        ranges, blocks = kind(), {}
        for op, a, k, value in ops:
            {"a": lambda: ranges.assign(a, a + k, value), "c": lambda: ranges.clear(a, a + k),
             "f": lambda: ranges.fill(a, a + k, value)}[op]()
            for i in range(a, a + k):
                if op == "a":
                    blocks[i] = value
                elif op == "c":
                    blocks.pop(i, None)
                else:
                    blocks.setdefault(i, value)
        maps.append((ranges, blocks))
    (mine, a), (theirs, b) = maps
    assert {i: (x, y) for lo, hi, x, y in mine.diff(theirs) for i in range(lo, hi)} == \
        {i: (a.get(i), b.get(i)) for i in set(a) | set(b) if a.get(i) != b.get(i)}
    for ranges, blocks in maps:
        items = ranges.items()
        assert {i: v for a, b, v in items for i in range(a, b)} == blocks
        # sorted, and merged where they touch with one value
        assert all(b < c or (b == c and v != w) for (_, b, v), (c, _, w) in zip(items, items[1:]))


# --- bad traces: every field of real records made wrong ------------------------------------------

def mutations(records):
    """(record index, field path, bad value) over one record of each kind and function of a lab
    trace (a refused offline's blocked_by one kind more, its own fields too): each field
    deleted, null, a string, negative, huge, a list, a dict."""
    picked, seen = [], set()
    for i, r in enumerate(records):
        kind = (r["type"], r.get("fn"), "blocked_by" in r)
        if kind not in seen and r["type"] != "header":
            seen.add(kind)
            picked.append(i)
    for i in picked:
        paths = [(f,) for f in records[i] if f != "type"]
        paths += [("blocked_by", f) for f in records[i].get("blocked_by") or {}]
        for path in paths:
            for bad in (DELETE, None, "x", -1, 1 << 70, [], {}):
                yield i, path, bad


DELETE = object()


@pytest.mark.parametrize("lab", ("lab-6.1", "lab-6.1-busy"))
def test_a_trace_with_any_field_made_wrong_is_replayed_or_refused_by_line(lab, tmp_path):
    """Never a traceback, a hang or a silent wrong answer: each wrong field is judged through
    (it changed nothing the model reads) or refused with its line."""
    from observer.trace import TraceError
    records = load(os.path.join(FIXTURES, lab, "trace.jsonl"))
    path = tmp_path / "t.jsonl"
    outcomes = {"judged": 0, "refused": 0}
    for i, fields, bad in mutations(records):
        mutated = copy.deepcopy(records)
        *parents, field = fields
        holder = mutated[i]
        for parent in parents:
            holder = holder[parent]
        if bad is DELETE:
            del holder[field]
        else:
            holder[field] = bad
        path.write_text("".join(json.dumps(r) + "\n" for r in mutated))
        try:
            replay(str(path))
            outcomes["judged"] += 1
        except TraceError as e:
            assert e.line == i + 1 or e.line == len(records), (fields, bad, str(e))
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and outcomes["judged"] > 100, outcomes
