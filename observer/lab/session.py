"""One lab session: boot one guest, run the chosen scenarios in it (batched: one boot for all),
then run `check` on every capture. Used by `memhp-observer lab` and by the tests."""

import json
import os
import shutil
import signal
import sys
import time

from .. import snapshot
from ..model.invariants import judge_views
from . import LabError, kernels
from .guest import Guest
from .marker import TOKEN_FILE
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
    return [a.to_dict() for a in judge_views(snapshot.take(path), 0)]


def run(results, names, release=None, progress=None):
    """Boot, run the scenarios, check every capture. Returns the summary (also summary.json)."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise LabError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    _fresh(results)
    began = time.monotonic()
    summary = {"scenarios": {}, "checks": {}}
    # SIGTERM ends the session like Ctrl-C: the guest is stopped, its console kept
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        kwargs = {"progress": progress} if progress else {}
        append = GUEST_APPEND + [a for n in names for a in SCENARIOS[n].append]
        with Guest(results, release=release, append=append, qemu_opts=GUEST_QEMU,
                   **kwargs) as guest:
            summary.update(kernel=guest.release, boot_seconds=round(guest.boot_seconds, 1))
            shutil.copy(kernels.config(guest.release), os.path.join(results, CONFIG))
            # the BPF daemon records what its probes (kprobes) see; beside it, recorders of the
            # same calls through fentry and of what procfs mode sees
            daemons = [start_daemon(guest, mode) for mode in DAEMONS]
            recorders = [start_recorder(guest, KFUNC_TRACE, "bpf", "kfunc"),
                         start_recorder(guest, PROCFS_TRACE, "procfs")]
            # bcc compiles for the daemon and the fentry recorder at once, one per vCPU (a third
            # compile beside them took 101 s in a 7.2 guest where two took 55)
            guest.say("starting the recorders and daemons (bcc compiles in the guest)")
            for recorder in recorders:
                wait_recorder(guest, recorder)
            summary["recorder_start_seconds"] = recorders[0]["seconds"]
            for daemon in daemons:
                wait_daemon(guest, daemon)
            scraper = guest.sh(f"{sys.executable} -m observer.lab.scrape {guest.results} "
                               f"{SCRAPE_SECONDS} " + " ".join(f"{m}={p}" for m, p in DAEMONS.items())
                               + " > /dev/null 2>&1 & echo $!")["out"].strip()
            for name in names:
                t = time.monotonic()
                summary["scenarios"][name] = {"steps": run_scenario(guest, SCENARIOS[name]),
                                              "seconds": round(time.monotonic() - t, 1)}
            summary["recorded"] = [stop_recorder(guest, r) for r in recorders]
            guest.sh(f"kill {scraper}")
            summary["metrics"] = {d["mode"]: scrape_daemon(guest, d) for d in daemons}
            keep_evidence(guest)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for path in captures(results):
        summary["checks"][os.path.relpath(path, results)] = check_capture(path)
    summary["seconds"] = round(time.monotonic() - began, 1)
    with open(os.path.join(results, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


CONFIG = "config"   # the guest kernel's config (Debian's), for the fidelity table
PROCFS_TRACE = "trace-procfs.jsonl"
KFUNC_TRACE = "trace-kfunc.jsonl"
SNAPSHOT_SECONDS = 3   # the recorders read the views this often, hotplug in flight or not


def start_recorder(guest, trace, mode="bpf", method="auto"):
    """`memhp-observer record` in the guest for the whole session, into RESULTS/`trace` (its log
    beside it, .log), started in the background."""
    exe = os.path.join(os.path.dirname(sys.executable), "memhp-observer")
    log = os.path.join(guest.results, trace.replace(".jsonl", ".log"))
    pid = guest.sh(f"{exe} record -o {guest.results}/{trace} --mode {mode} --probe-method {method} "
                   f"--snapshot-interval {SNAPSHOT_SECONDS} > {log} 2>&1 & echo $!")["out"].strip()
    return {"pid": pid, "log": log, "began": time.monotonic()}


def wait_recorder(guest, recorder, timeout=300):
    """Until the recorder's probes are attached (it says so in its log)."""
    log = recorder["log"]
    while "recording to" not in _read(log):
        if time.monotonic() - recorder["began"] > timeout or \
                guest.sh(f"kill -0 {recorder['pid']}", check=False)["rc"]:
            raise LabError(f"the recorder did not start; {log}:\n{_read(log)[-2000:]}")
        time.sleep(1)
    recorder["seconds"] = round(time.monotonic() - recorder["began"], 1)
    guest.say(_read(log).strip().splitlines()[-1])


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


# The daemons watch the whole session at a 1 s reconcile, one per mode: each records what its
# model was fed (replay must judge it the same) and is scraped at the end.
DAEMONS = {"bpf": 9477, "procfs": 9478}
RECONCILE_SECONDS = 1
SCRAPE_SECONDS = 5     # their /metrics, as Prometheus would scrape them (observer/lab/scrape.py)


def daemon_files(mode):
    """(log, recorded trace, metrics, anomaly journal) of the daemon of this mode, in the
    results directory."""
    return (f"daemon-{mode}.log", f"daemon-{mode}.jsonl", f"metrics-{mode}.txt",
            f"journal-{mode}.jsonl")


def start_daemon(guest, mode):
    """`memhp-observer run` in the guest in this mode (bpf: its own probes)."""
    exe = os.path.join(os.path.dirname(sys.executable), "memhp-observer")
    log, record, _, journal = (os.path.join(guest.results, f) for f in daemon_files(mode))
    pid = guest.sh(f"{exe} run --listen 127.0.0.1:{DAEMONS[mode]} --mode {mode} "
                   f"--reconcile-interval {RECONCILE_SECONDS} --record {record} --journal {journal} "
                   f"> {log} 2>&1 & echo $!")["out"].strip()
    return {"pid": pid, "log": log, "mode": mode}


def wait_daemon(guest, daemon, timeout=300):
    """Until the daemon serves /metrics: its probes attach first (bcc compiles in the guest)."""
    deadline = time.monotonic() + timeout
    while "serving /metrics" not in _read(daemon["log"]):
        if time.monotonic() > deadline:
            raise LabError(f"the daemon did not start; {daemon['log']}:\n{_read(daemon['log'])[-2000:]}")
        time.sleep(1)


# What the tests check the trace against, kept from the guest at the end of the session: the
# symbols and module bounds the stacks were named from, pahole's struct offsets from the guest
# kernel's BTF, and the program the probes loaded.
EVIDENCE = {"kallsyms.txt": "cat /proc/kallsyms", "modules.txt": "cat /proc/modules",
            "pahole.txt": "pahole -C zone,pglist_data,dev_pagemap,resource,range,mhp_params,page "
                          "/sys/kernel/btf/vmlinux 2>/dev/null",
            "program.c": "{exe} probes --ebpf"}


def keep_evidence(guest):
    exe = os.path.join(os.path.dirname(sys.executable), "memhp-observer")
    for name, command in EVIDENCE.items():
        guest.sh(f"{command.format(exe=exe)} > {guest.results}/{name}", timeout=300)


def scrape_daemon(guest, daemon):
    """/metrics of a guest's daemon into RESULTS/metrics-MODE.txt, then SIGTERM it and wait
    for it to finish its log (what it judged last, when it stopped)."""
    name = daemon_files(daemon["mode"])[2]
    guest.sh(f"{sys.executable} -c 'import urllib.request,sys; sys.stdout.write(urllib.request."
             f"urlopen(\"http://127.0.0.1:{DAEMONS[daemon['mode']]}/metrics\", timeout=30).read()"
             f".decode())' > {os.path.join(guest.results, name)}")
    guest.sh(f"kill -TERM {daemon['pid']}")
    deadline = time.monotonic() + 60
    while "\nmemhp-observer: stopped" not in _read(daemon["log"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return name


def _fresh(results):
    """An empty results directory: an earlier session's (it has a lab-token) is emptied, any
    other non-empty directory is refused rather than mixed with."""
    os.makedirs(results, exist_ok=True)
    entries = os.listdir(results)
    if entries and TOKEN_FILE not in entries:
        raise LabError(f"{results} is not empty and holds no earlier lab session: choose "
                       f"another --results directory")
    for name in entries:
        path = os.path.join(results, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
