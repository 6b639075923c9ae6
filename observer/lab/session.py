"""One lab session: boot one guest, run the chosen scenarios in it (batched: one boot for all),
then run `check` on every capture. Used by `memhp-observer lab` and by the tests."""

import json
import os
import signal
import sys
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
            # the probes' trace, and beside it what procfs mode sees (snapshots and uevents)
            recorders = [start_recorder(guest, TRACE), start_recorder(guest, PROCFS_TRACE, "procfs")]
            summary["recorder_start_seconds"] = recorders[0]["seconds"]
            for name in names:
                t = time.monotonic()
                summary["scenarios"][name] = {"steps": run_scenario(guest, SCENARIOS[name]),
                                              "seconds": round(time.monotonic() - t, 1)}
            summary["recorded"] = [stop_recorder(guest, r) for r in recorders]
    finally:
        signal.signal(signal.SIGTERM, previous)
    for path in captures(results):
        summary["checks"][os.path.relpath(path, results)] = check_capture(path)
    summary["seconds"] = round(time.monotonic() - began, 1)
    with open(os.path.join(results, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


TRACE = "trace.jsonl"
PROCFS_TRACE = "trace-procfs.jsonl"


def start_recorder(guest, trace, mode="bpf", timeout=300):
    """`memhp-observer record` in the guest for the whole session, into RESULTS/TRACE (its log
    beside it, .log); returns once its probes are attached (it says so in its log)."""
    exe = os.path.join(os.path.dirname(sys.executable), "memhp-observer")
    log = os.path.join(guest.results, trace.replace(".jsonl", ".log"))
    began = time.monotonic()
    pid = guest.sh(f"{exe} record -o {guest.results}/{trace} --mode {mode} "
                   f"--snapshot-interval 60 > {log} 2>&1 & echo $!")["out"].strip()
    guest.say("starting the recorder (bcc compiles in the guest)")
    while "recording to" not in _read(log):
        if time.monotonic() - began > timeout or guest.sh(f"kill -0 {pid}", check=False)["rc"]:
            raise LabError(f"the recorder did not start; {log}:\n{_read(log)[-2000:]}")
        time.sleep(1)
    guest.say(_read(log).strip().splitlines()[-1])
    return {"pid": pid, "log": log, "seconds": round(time.monotonic() - began, 1)}


def stop_recorder(guest, recorder, timeout=120):
    """SIGINT: the recorder drains its events, takes a last snapshot, says "recorded ..." and
    exits. (Its pid cannot tell: the guest's init does not reap orphans, so it stays a zombie.)"""
    log = recorder["log"]
    guest.sh(f"kill -INT {recorder['pid']}")
    began = time.monotonic()
    while "\nrecorded " not in _read(log):
        if time.monotonic() - began > timeout:
            raise LabError(f"the recorder did not finish in {timeout} s; {log}:\n{_read(log)[-2000:]}")
        time.sleep(0.5)
    return _read(log).strip().splitlines()[-1]


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
