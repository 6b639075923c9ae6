"""The lab benchmarks, in one guest of Debian's 6.12 under QEMU/TCG (the lab's, with its boot
Movable zone; bench/guest.py does the guest's side). Start-up: from launch to READY (/metrics
answers: probes attached, first read judged) of the daemon in BPF mode, against Debian's
bpftrace attaching kprobes on the same four core functions (until its BEGIN runs, after them),
three of each in turn, the medians compared; the daemon loads the program its first start in
the boot compiled and kept (timed apart, before them); beside them, what any bcc tool pays: bcc
compiling an empty program and attaching it to the four (until it says so), in the same turns.
Idle: the BPF-mode daemon's CPU time as a share of one core, and its RSS, at the default
reconcile interval. Probe overhead: offline and online of one boot-Movable block, timed cycle by
cycle. The daemon's kprobes: in turns of 20 cycles, on (armed, the daemon running), armed
alone (the daemon stopped: the probes' own cost, their records waiting in the ring buffer) and
off (every kprobe disarmed through debugfs, the daemon stopped), 10 rounds, since under TCG a
guest's cycle drifts by tens of percent within minutes; each turn begins once the daemon has
been idle half a second (in an on turn it has then taken what came while it was stopped), so
every kind begins from a guest as idle: the first cycles after idling take longer. The daemon
through fentry (which cannot be disarmed) in turns too, 4 rounds: on, the daemon started until
READY, then idle half a second; off, the daemon ended (its programs detached with it), the guest
idle half a second. Beside them, in the same way as fentry, what the kernel's kprobes cost
before any work of the daemon's: bpftrace with the daemon's probes on the watched functions the
kernel has (an entry and a return probe on each, an entry probe on an annotation), each only
counting calls. And the BPF programs timed by the kernel (kernel.bpf_stats_enabled) over as
many cycles: the daemon's kprobes after their turns, and, after its first on turn, the fentry
daemon's and bpftrace's counting. Their time a cycle, against the cycle's CPU time, is a floor
of the overhead that TCG's drift does not blur (it leaves out the kprobes' dispatch and the
daemon's work on the events); bpftrace's counting programs so timed are the floor of any BPF
program on these calls under TCG. Every turn begins with a cycle
left untimed (arming, disarming, attaching and detaching rewrite kernel text, which QEMU then
translates anew). Each cycle is timed twice: its wall time, and the CPU time of the thread that
cycles (the probes run in it; the wall time also takes what the other CPU does meanwhile, since
an offline waits on every CPU). The overhead is the median cycle's against the median without,
for each. Latency: after each offline or online returns, until the daemon's /metrics counts the
call; and with onlining made to fail (memory notifier error injection), until its anomaly
journal holds the failure. Under TCG every guest instruction is emulated: times are those of the
emulated machine, and the ratios are what compare. Budgets (DESIGN.md §7): start-up no slower
than bpftrace, idle ≤ 0.5% of one core, overhead ≤ 1%, latency p99 ≤ 100 ms."""

import compileall
import json
import os
import shlex
import statistics
import sys

from observer.lab.guest import Guest
from observer.lab.scenarios import GUEST_APPEND, GUEST_QEMU, INJECT, INJECT_DIR
from observer.probes.functions import ALL, ANNOTATIONS

from .processes import EXE, KILL_AFTER

KERNEL = "6.12"
CORE = ("arch_add_memory", "__remove_pages", "release_mem_region_adjustable", "devm_memremap_pages")
BPFTRACE_EXE = "/usr/bin/bpftrace"
# bpftrace runs BEGIN once every probe is attached (kprobe_multi where the kernel has it, which
# /sys/kernel/debug/kprobes/list does not show)
BPFTRACE = ('BEGIN { printf("attached\\n"); } ' + ",".join(f"kprobe:{fn}" for fn in CORE) +
            " { @[probe] = count(); }")
# what any bcc tool pays at start: bcc compiling an empty program, attached to the same four
BCC_FLOOR = ("import signal; from bcc import BPF; "
             "b = BPF(text='int empty(void *ctx) { return 0; }'); "
             f"[b.attach_kprobe(event=fn, fn_name='empty') for fn in {CORE!r}]; "
             "print('attached', flush=True); signal.pause()")
SYSTEM_PYTHON = "/usr/bin/python3"   # the one that imports Debian's bcc
PORT = 9477
TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_OVERHEAD = 1.0          # %
MAX_P99 = 0.100             # seconds
MAX_IDLE_PERCENT = 0.5


def rows(quick, work, progress):
    # a cycle takes a few ms: many make the median steady; each latency sample waits on /metrics
    n, idle_seconds = (3, 5) if quick else (30, 60)
    starts = 1 if quick else 3   # each kind in turn: the first of a boot reads a cold page cache
    rounds, batch = (2, 3) if quick else (10, 20)
    fentry_rounds = 1 if quick else 4   # each on turn starts the daemon: half a minute
    results = os.path.join(work, "lab")
    os.makedirs(results)
    # the daemon as an install has it, its modules compiled (pip and dpkg compile at install): a
    # checkout's bytecode may be missing or stale, and the guest cannot keep what it compiles
    compileall.compile_dir(os.path.join(TOP, "observer"), quiet=1)
    with Guest(results, release=KERNEL, append=GUEST_APPEND, qemu_opts=GUEST_QEMU,
               progress=progress) as guest:
        def run(*args, timeout=900):
            argv = [sys.executable, "-m", "bench.guest", results, *map(str, args)]
            out = guest.sh(f"cd {TOP} && {shlex.join(argv)}", timeout=timeout)["out"]
            return json.loads(out)

        def stop(pid):
            """SIGTERM, SIGKILL after KILL_AFTER seconds, until the process is gone or a zombie
            (reparented in the guest: nobody reaps it)."""
            ended = f"[ ! -e /proc/{pid} ] || grep -q '^State:.*Z' /proc/{pid}/status"
            guest.sh(f"kill -TERM {pid}; for i in $(seq {KILL_AFTER * 5}); do {ended} && exit; "
                     f"sleep 0.2; done; kill -KILL {pid}; until {ended}; do sleep 0.2; done",
                     timeout=KILL_AFTER + 120)

        guest.sh(INJECT)    # and debugfs, where the kernel lists its kprobes
        journal = f"{results}/journal.jsonl"
        bpftrace_seconds, floor_seconds, daemon_seconds = [], [], []
        # an image cache of this boot's own: the first start compiles, the others load
        daemon_argv = ["env", "CACHE_DIRECTORY=/run/memhp-bench-cache", EXE, "run", "--mode",
                       "bpf", "--listen", f"127.0.0.1:{PORT}", "--journal", journal]
        progress("lab: the daemon's first start on this kernel: bcc compiles its program, kept "
                 "for the next starts")
        first = run("ready", json.dumps({"argv": daemon_argv, "log": f"{results}/daemon-first.log",
                                         "port": PORT}))
        stop(first["pid"])
        for start in range(starts):
            progress(f"lab: start {start + 1} of {starts}: bpftrace attaching the four core "
                     f"kprobes, bcc an empty program on them, then the daemon in BPF mode until "
                     f"READY")
            bpftrace = run("ready", json.dumps({"argv": [BPFTRACE_EXE, "-B", "none", "-e",
                                                         BPFTRACE],
                                                "log": f"{results}/bpftrace.log",
                                                "says": "attached"}))
            stop(bpftrace["pid"])
            floor = run("ready", json.dumps({"argv": [SYSTEM_PYTHON, "-c", BCC_FLOOR],
                                             "log": f"{results}/bcc-floor.log",
                                             "says": "attached"}))
            stop(floor["pid"])
            floor_seconds.append(floor["seconds"])
            daemon = run("ready", json.dumps({"argv": daemon_argv, "log": f"{results}/daemon.log",
                                              "port": PORT}))
            bpftrace_seconds.append(bpftrace["seconds"])
            daemon_seconds.append(daemon["seconds"])
            if start < starts - 1:   # the last one stays for what follows
                stop(daemon["pid"])
        progress(f"lab: the daemon idle for {idle_seconds} s")
        idle = run("idle", daemon["pid"], idle_seconds)
        progress(f"lab: latency over {n} cycles and {n} failed onlines")
        latency = run("latency", n, PORT, journal, INJECT_DIR)
        progress(f"lab: {rounds} rounds of {batch} cycles with the daemon's kprobes on, armed alone "
                 f"(the daemon stopped), then off")
        turns = run("in_turns", rounds, batch, daemon["pid"])
        progress(f"lab: {rounds * batch} cycles with the kernel timing the daemon's BPF programs")
        probe_time = run("probe_time", rounds * batch, daemon["pid"])
        stop(daemon["pid"])
        progress(f"lab: {fentry_rounds} rounds of {batch} cycles with the daemon through fentry, "
                 f"started and stopped in turns; {rounds * batch} cycles more with the kernel "
                 f"timing its programs")
        fentry_argv = [EXE, "run", "--mode", "bpf", "--probe-method", "kfunc", "--listen",
                       f"127.0.0.1:{PORT}"]
        fentry = run("restarted_turns", fentry_rounds, batch,
                     json.dumps({"argv": fentry_argv, "log": f"{results}/daemon-fentry.log",
                                 "port": PORT}), rounds * batch)
        watched = _in_kallsyms(guest, ALL)
        progress(f"lab: {fentry_rounds} rounds of {batch} cycles with bpftrace counting on the "
                 f"{len(watched)} watched functions this kernel has, started and stopped in "
                 f"turns; {rounds * batch} cycles more with the kernel timing its programs")
        bpftrace_turns = run("restarted_turns", fentry_rounds, batch,
                             json.dumps({"argv": [BPFTRACE_EXE, "-B", "none", "-e",
                                                  _counting(watched)],
                                         "log": f"{results}/bpftrace-counting.log",
                                         "says": "attached"}), rounds * batch)
    where = f"Debian {KERNEL} guest (TCG)"
    ours, theirs = statistics.median(daemon_seconds), statistics.median(bpftrace_seconds)
    out = [{"benchmark": f"start-up to READY, BPF mode (kprobes, the program kept from the first "
                         f"start), median of {starts}",
            "where": where, "measured": f"{ours:.1f} s ({_seconds(daemon_seconds)})",
            "reference": f"bpftrace attaching the 4 core kprobes {theirs:.1f} s "
                         f"({_seconds(bpftrace_seconds)})",
            "ratio": ours / theirs, "budget": "≤ 1.0×", "within": ours <= theirs},
           {"benchmark": "start-up to READY, the first on this kernel (bcc compiles the program "
                         "and keeps it)", "where": where, "measured": f"{first['seconds']:.1f} s",
            "reference": f"bpftrace as above {theirs:.1f} s",
            "ratio": first["seconds"] / theirs, "budget": "—", "within": None},
           {"benchmark": f"start-up, bcc's own: an empty program on the 4 core kprobes, median of "
                         f"{starts}", "where": where,
            "measured": f"{statistics.median(floor_seconds):.1f} s ({_seconds(floor_seconds)})",
            "reference": f"bpftrace as above {theirs:.1f} s",
            "ratio": statistics.median(floor_seconds) / theirs, "budget": "—", "within": None},
           {"benchmark": f"idle daemon CPU, BPF mode, 10 s reconcile, {idle_seconds} s", "where": where,
            "measured": f"{idle['percent']:.2f}% of a core (RSS {idle['rss_bytes'] >> 20} MiB)",
            "reference": "—", "ratio": None, "budget": f"≤ {MAX_IDLE_PERCENT}% of a core",
            "within": idle["percent"] <= MAX_IDLE_PERCENT}]
    for name, turned, said, budgeted in (
            ("kprobes (the daemon), on and off in turns", turns, "kprobes disarmed, daemon stopped",
             True),
            ("kprobes armed, the daemon stopped (the probes alone), in the same turns",
             {"on": turns["armed"], "off": turns["off"]}, "kprobes disarmed, daemon stopped",
             False),
            ("fentry (the daemon), started and stopped in turns", fentry,
             "daemon ended, its programs detached", True),
            (f"kprobes (bpftrace counting calls of the {len(watched)} watched functions), started "
             f"and stopped in turns", bpftrace_turns, "bpftrace ended", False)):
        for which, column in (("wall time", 0), ("CPU time of the cycling thread", 1)):
            base = statistics.median(c[column] for c in turned["off"])
            median = statistics.median(c[column] for c in turned["on"])
            extra = 100 * (median / base - 1)
            out.append({"benchmark": f"probe overhead, {name}, {which}, median of "
                                     f"{len(turned['on'])} cycles",
                        "where": where, "measured": f"{median * 1e3:.2f} ms a cycle ({extra:+.1f}%)",
                        "reference": f"{said}, median of {len(turned['off'])}: {base * 1e3:.2f} ms",
                        "ratio": median / base,
                        "budget": f"≤ +{MAX_OVERHEAD:g}%" if budgeted else "—",
                        "within": extra <= MAX_OVERHEAD if budgeted else None})
    for who, timed, budgeted in (("kprobes (the daemon's BPF programs", probe_time, True),
                                 ("fentry (the daemon's BPF programs", fentry["timed"], True),
                                 (f"kprobes (bpftrace's counting programs on the {len(watched)} "
                                  f"watched functions", bpftrace_turns["timed"], False)):
        n_cycles, runs = len(timed["cycles"]), timed["runs"]
        cpu = sum(c[1] for c in timed["cycles"]) / n_cycles
        per_cycle = timed["run_ns"] / 1e9 / n_cycles
        out.append({"benchmark": f"probe run time, {who}, as the kernel times them), "
                                 f"{n_cycles} cycles",
                    "where": where,
                    "measured": f"{per_cycle * 1e6:.0f} µs a cycle ({runs / n_cycles:.1f} runs of "
                                f"{timed['run_ns'] / max(1, runs) / 1e3:.1f} µs)",
                    "reference": f"CPU time of the cycling thread, {cpu * 1e3:.2f} ms a cycle",
                    "ratio": per_cycle / cpu,
                    "budget": f"≤ {MAX_OVERHEAD / 100:g}× (the overhead's floor)" if budgeted
                              else "—",
                    "within": per_cycle / cpu <= MAX_OVERHEAD / 100 if budgeted else None})
    for name, seconds in (("kernel call to metric", latency["to_metric"]),
                          ("kernel call to anomaly journalled", latency["to_anomaly"])):
        seen = sorted(s for s in seconds if s is not None)
        missed = len(seconds) - len(seen)
        p50, p99 = _quantile(seen, 0.5), _quantile(seen, 0.99)
        out.append({"benchmark": f"latency, {name}, {len(seconds)} calls", "where": where,
                    "measured": f"p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms"
                                + (f", {missed} not seen in 10 s" if missed else ""),
                    "reference": "—", "ratio": None, "budget": f"p99 ≤ {MAX_P99 * 1e3:.0f} ms",
                    "within": not missed and p99 <= MAX_P99})
    return out


def _in_kallsyms(guest, functions):
    """The functions the guest's kernel has under their own names (its kallsyms)."""
    wanted = " ".join(f"-e {fn}" for fn in functions)
    out = guest.sh(f"awk '$2 ~ /^[tTwW]$/ {{print $3}}' /proc/kallsyms | grep -xF {wanted}",
                   timeout=120)["out"]
    return [fn for fn in functions if fn in out.split()]


def _counting(functions):
    """bpftrace's program with the daemon's probes on the functions, each only counting: an entry
    probe on each, a return probe on each but an annotation (the daemon's are so)."""
    returns = [fn for fn in functions if fn not in ANNOTATIONS]
    return ('BEGIN { printf("attached\\n"); } ' +
            ",".join(f"kprobe:{fn}" for fn in functions) + " { @calls = count(); } " +
            ",".join(f"kretprobe:{fn}" for fn in returns) + " { @returns = count(); }")


def _seconds(values):
    return ", ".join(f"{v:.1f}" for v in values)


def _quantile(sorted_values, q):
    """The nearest-rank quantile; nan of nothing."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))]
