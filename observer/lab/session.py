"""One lab session: boot one guest, run the chosen scenarios in it (batched: one boot for all),
then run `check` on every capture. Used by `memhp-observer lab` and by the tests."""

import json
import os
import signal
import time

from .. import check, snapshot
from .guest import Guest, LabError
from .scenarios import GUEST_APPEND, GUEST_QEMU, SCENARIOS, run_scenario


def captures(results):
    """Every capture directory under results, in the order the steps took them."""
    root = os.path.join(results, "captures")
    out = []
    for scenario in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for step in sorted(os.listdir(os.path.join(root, scenario))):
            out.append(os.path.join(root, scenario, step))
    return out


def check_capture(path):
    snap = snapshot.take(path)
    return [a.to_dict() for a in check.check(snap, snapshot.PAGE_SIZE, 0)]


def run(results, names, release=None, progress=None):
    """Boot, run the scenarios, check every capture. Returns the summary (also summary.json)."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise LabError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    os.makedirs(results, exist_ok=True)
    began = time.monotonic()
    summary = {"scenarios": {}, "checks": {}}
    # SIGTERM ends the session like Ctrl-C: the guest is stopped, its console kept
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        kwargs = {"progress": progress} if progress else {}
        with Guest(results, release=release, append=GUEST_APPEND, qemu_opts=GUEST_QEMU,
                   **kwargs) as guest:
            summary.update(kernel=guest.release, boot_seconds=round(guest.boot_seconds, 1))
            for name in names:
                t = time.monotonic()
                summary["scenarios"][name] = {"steps": run_scenario(guest, SCENARIOS[name]),
                                              "seconds": round(time.monotonic() - t, 1)}
    finally:
        signal.signal(signal.SIGTERM, previous)
    for path in captures(results):
        summary["checks"][os.path.relpath(path, results)] = check_capture(path)
    summary["seconds"] = round(time.monotonic() - began, 1)
    with open(os.path.join(results, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
