"""`memhp-observer map`: pictures of lab captures and lab traces, checked against the kernel's
own text (the zone names /proc/zoneinfo prints) and against what replay reports."""

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

from conftest import FIXTURES

EXE = os.path.join(os.path.dirname(sys.executable), "memhp-observer")


def run_map(*args):
    return subprocess.run([EXE, "map", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def svg_texts(path):
    """Every text the SVG holds (matplotlib writes text as paths with its string in a comment)."""
    data = open(path).read()
    ET.fromstring(data)                        # well-formed
    return set(re.findall(r"<!-- (.*?) -->", data))


def test_a_capture_is_drawn_with_every_zone_the_kernel_spans(tmp_path):
    root = os.path.join(FIXTURES, "lab-6.1", "dimm", "05-online-movable")
    out = tmp_path / "map.svg"
    done = run_map("-o", out, "--root", root)
    assert done.returncode == 0, done.stderr
    # zones whose span the kernel shows (the Device zone, with no present page, hides its start)
    with open(os.path.join(root, "proc", "zoneinfo")) as f:
        sections = re.split(r"^Node \d+, zone +", f.read(), flags=re.M)[1:]
    shown = {sec.split()[0] for sec in sections
             if int(re.search(r"spanned\s+(\d+)", sec).group(1)) and "start_pfn:" in sec}
    assert shown and shown <= svg_texts(out)
    assert {"memory blocks", "resources", "online Movable"} <= svg_texts(out)


def test_a_trace_is_drawn_with_its_pagemaps_and_its_anomalies(tmp_path):
    # the 6.1 trace with one offline that left Movable's span wide (the model's own test case)
    path = os.path.join(FIXTURES, "lab-6.1", "trace.jsonl")
    records = [json.loads(line) for line in open(path)]
    for r in records:
        if r["type"] == "event" and r["fn"] == "offline_pages" and r["ret"] == 0 and \
                r["span_before"]["start_pfn"] != r["span_after"]["start_pfn"]:
            r["span_after"] = dict(r["span_before"], present=r["span_after"]["present"])
            break
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in records))
    kinds = {a["kind"] for a in json.loads(subprocess.run(
        [EXE, "replay", "--json", str(trace)], capture_output=True, text=True).stdout)["anomalies"]}
    out = tmp_path / "map.svg"
    assert run_map("-o", out, "--trace", trace).returncode == 0
    texts = svg_texts(out)
    assert "zone_span_leak" in kinds and kinds <= texts   # every kind has its row
    assert {"pagemaps", "fs_dax"} <= texts                # the namespaces still mapped at the end
    png = tmp_path / "map.png"
    assert run_map("-o", png, "--trace", trace).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_map_refuses_what_it_cannot_draw(tmp_path):
    bad = run_map("-o", tmp_path / "map.jpg", "--root", os.path.join(FIXTURES, "host-6.18"))
    assert bad.returncode == 2 and "png or .svg" in bad.stderr
    junk = tmp_path / "junk.jsonl"
    junk.write_text("{}\n")
    unreadable = run_map("-o", tmp_path / "m.png", "--trace", junk)
    assert unreadable.returncode == 2 and f"{junk}:1:" in unreadable.stderr
    assert "Traceback" not in bad.stderr + unreadable.stderr
