"""The kernel fidelity table of the README, made from lab results directories (`memhp-observer
lab --fidelity DIR...`): one row per boot, with the kernel series, which hotplug paths its
scenarios took, how many of the probed functions attached by kprobe and by fentry, and the
anomaly kinds its scenarios are meant to make beside those the BPF daemon reported."""

import json
import os
import re

from . import session
from .scenarios import PATHLESS, SCENARIOS

# column -> the (scenario, step) that takes the path
PATHS = {
    "kmem": ("kmem", "online"),
    "fsdax": ("fsdax", "fsdax"),
    "devdax": ("fsdax", "devdax"),
    "ACPI DIMM": ("dimm", "device-add"),
    "virtio-mem": ("virtio-mem", "grow"),
    "sysfs offline/online": ("offline-edge", "offline"),
    "device-private": ("device-private", "map"),
}
# the daemon's words on its own load, not on the kernel
NOT_KERNEL = ("events_lost",)
COLUMNS = (["kernel"] + list(PATHS) + ["also run", "kprobe", "fentry", "anomalies expected",
                                       "anomalies reported"])


class NotResults(Exception):
    """A directory that is not a finished lab session's results: names the file."""


def row(results):
    """The table row of one lab session, from its results directory."""
    try:
        return _row(results)
    except OSError as e:
        raise NotResults(f"{e.filename}: {e.strerror}: not the results of a finished lab "
                         f"session") from None
    except (ValueError, KeyError, TypeError) as e:
        raise NotResults(f"{results}: not the results of a finished lab session "
                         f"({type(e).__name__}: {e})") from None


def _row(results):
    with open(os.path.join(results, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(results, "steps.jsonl")) as f:
        done = {(r["scenario"], r["step"]) for r in map(json.loads, f)}
    private = _config(results).get("CONFIG_DEVICE_PRIVATE") == "y"
    cells = [".".join(summary["kernel"].split(".")[:2])]
    for column, step in PATHS.items():
        cells.append("✓" if step in done else
                     "n/a" if column == "device-private" and not private else "–")
    cells.append(", ".join(n for n in PATHLESS if n in summary["scenarios"]) or "–")
    for trace in (session.daemon_files("bpf")[1], session.KFUNC_TRACE):
        probes = _header(os.path.join(results, trace))["probes"]
        cells.append(f"{sum(p['attached'] for p in probes.values())}/{len(probes)}")
    cells.append(_kinds(expected(summary["scenarios"])))
    cells.append(_kinds(reported(results)))
    return cells


def expected(scenarios):
    """The anomaly kinds (warning or critical) the scenarios are meant to make."""
    return {kind for name in scenarios for kind in SCENARIOS[name].makes}


def reported(results):
    """The anomaly kinds (warning or critical) the BPF daemon journalled, but its own losses."""
    with open(os.path.join(results, session.daemon_files("bpf")[3])) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["kind"] for r in records if r["type"] == "anomaly" and r["severity"] != "info"
            and r["kind"] not in NOT_KERNEL}


def table(results_dirs):
    """The whole table in Markdown: rows by kernel series, then in the order given."""
    rows = [row(d) for d in results_dirs]
    rows.sort(key=lambda cells: [int(x) for x in cells[0].split(".")])
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) + "\n"


def _kinds(kinds):
    return ", ".join(f"`{k}`" for k in sorted(kinds)) or "none"


def _header(path):
    with open(path) as f:
        return json.loads(f.readline())


def _config(results):
    """The guest kernel's config (Debian's, copied into the results by the session)."""
    try:
        with open(os.path.join(results, session.CONFIG)) as f:
            return dict(re.findall(r"^(CONFIG_\w+)=(.*)$", f.read(), re.M))
    except OSError:
        return {}
