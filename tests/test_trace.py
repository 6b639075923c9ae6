"""Trace v1 reading, and the call-order release, on the trace a Debian 6.1 lab guest recorded
while running every scenario (tests/fixtures/lab-6.1/trace.jsonl)."""

import json
import random

import pytest

from conftest import FIXTURES
from observer.probes.decode import origin
from observer.probes.order import CallOrder
from observer.trace import TraceError, TraceWriter, read_trace

TRACE = f"{FIXTURES}/lab-6.1/trace.jsonl"


def lines():
    with open(TRACE) as f:
        return f.read().splitlines()


def test_reader_streams_every_record():
    records = list(read_trace(TRACE))
    assert len(records) == len(lines())
    assert records[0]["type"] == "header" and records[0]["kernel"].startswith("6.1.")
    assert {r["type"] for r in records} == {"header", "snapshot", "event"}


def test_writer_reproduces_the_file(tmp_path):
    w = TraceWriter(str(tmp_path / "t.jsonl"))
    for r in read_trace(TRACE):
        w.write(r)
    w.close()
    assert (tmp_path / "t.jsonl").read_text().splitlines() == lines()


@pytest.mark.parametrize("change, message", [
    (lambda ls: ls[:5] + ["{not json"] + ls[6:], (6, "not JSON")),
    (lambda ls: ls[1:], (1, "the first line must be the header")),
    (lambda ls: ls[:3] + [ls[3].replace('"type":"event"', '"type":"evnt"')] + ls[4:], (4, "unknown record type")),
    (lambda ls: ls[:3] + [ls[3].replace('"origin":', '"origen":')] + ls[4:], (4, "event without origin")),
    (lambda ls: [ls[0].replace('"version":1', '"version":2')] + ls[1:], (1, "not a memhp-trace v1")),
])
def test_malformed_trace_names_file_and_line(tmp_path, change, message):
    assert json.loads(lines()[3])["type"] == "event"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(change(lines())) + "\n")
    with pytest.raises(TraceError) as err:
        list(read_trace(str(bad)))
    assert (err.value.line, message[1] in err.value.message) == (message[0], True)
    assert str(err.value).startswith(f"{bad}:{message[0]}: ")


def test_call_order_is_restored_from_any_arrival_order():
    events = [r for r in read_trace(TRACE) if r["type"] == "event"]
    rng = random.Random(7)
    for _ in range(5):
        shuffled = events[:]
        rng.shuffle(shuffled)
        order, out = CallOrder(), []
        for i, e in enumerate(shuffled):
            out += order.feed(e, now=i)
        assert [e["seq"] for e in out] == [e["seq"] for e in events] and not order.pending


def test_a_missing_event_is_skipped_after_the_stall_time():
    events = [r for r in read_trace(TRACE) if r["type"] == "event"][:20]
    order = CallOrder(stall_seconds=10)
    out = []
    for e in events[:5] + events[6:]:     # seq 5 never arrives (lost)
        out += order.feed(e, now=0)
    assert [e["seq"] for e in out] == list(range(5))
    assert order.expire(now=5) == []
    out += order.expire(now=11)
    assert [e["seq"] for e in out] == [e["seq"] for e in events[:5] + events[6:]]
    assert order.skipped == 1


def test_origin_comes_from_the_recorded_stacks():
    events = [r for r in read_trace(TRACE) if r["type"] == "event"]
    assert all(origin(e["stack"]) == e["origin"] for e in events)
    by_fn = {}
    for e in events:
        by_fn.setdefault((e["fn"], e["origin"]), e)
    assert ("arch_add_memory", "virtio_mem") in by_fn and ("arch_add_memory", "acpi") in by_fn
    assert ("devm_memremap_pages", "fsdax") in by_fn and ("online_pages", "sysfs") in by_fn
