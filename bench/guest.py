"""The lab benchmarks' side in the guest (`python -m bench.guest RESULTS VERB ...`, run by
bench/lab.py through the lab agent): hotplug cycles timed in turns with the daemon's probes on
and off, and with the kernel timing its BPF programs, the daemon's /metrics and journal watched
for what a cycle makes, processes started and timed until ready. Prints one JSON object.
Refuses to run outside a lab guest, like every writer of hotplug sysfs files here."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from observer.lab.marker import NotALabGuest, require_lab_guest

from .processes import KILL_AFTER, cpu_seconds, until_idle

MEM = "/sys/devices/system/memory"
KPROBES_ENABLED = "/sys/kernel/debug/kprobes/enabled"   # 0 disarms every kprobe, 1 arms them
# 1: the kernel times every BPF program run (run_time_ns, run_cnt in each program fd's fdinfo)
BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


def movable_block():
    """A block online in the boot Movable zone, from the middle (its edges may hold pages that
    will not move)."""
    blocks = sorted(int(name[6:]) for name in os.listdir(MEM) if re.fullmatch(r"memory\d+", name)
                    and _read(f"{MEM}/{name}/state") == "online"
                    and _read(f"{MEM}/{name}/valid_zones") == "Movable")
    if len(blocks) < 3:
        sys.exit("bench.guest: no boot Movable zone to cycle (movablecore= on the cmdline)")
    return blocks[len(blocks) // 2]


def _read(path):
    with open(path) as f:
        return f.read().strip()


def _write(path, word, tries=20):
    """Write a state; a Movable block is sometimes briefly busy (EBUSY): tried again."""
    for attempt in range(tries):
        try:
            with open(path, "w") as f:
                f.write(word)
            return
        except OSError:
            if attempt == tries - 1:
                raise
            time.sleep(0.5)


def cycle(block):
    """(seconds, CPU seconds of this thread) of one offline and online of the block (the two
    writes). The probes run in the thread that calls: their cost is in its CPU time, while the
    wall time also takes what the other CPU does meanwhile (an offline waits on every CPU)."""
    t, cpu = time.monotonic(), time.thread_time()
    _write(f"{MEM}/memory{block}/state", "offline")
    _write(f"{MEM}/memory{block}/state", "online_movable")
    return time.monotonic() - t, time.thread_time() - cpu


def _turn_of_cycles(block, n):
    """n cycles timed after one that is not: arming, disarming, attaching or detaching probes
    rewrites kernel text, which QEMU then translates anew."""
    cycle(block)
    return [cycle(block) for _ in range(n)]


def in_order(r, kinds):
    """Round r's order of the kinds of turn: as given in even rounds, reversed in odd ones, so
    that no kind always follows the same one."""
    return kinds if r % 2 == 0 else kinds[::-1]


def in_turns(rounds, batch, pid):
    """Cycles with the daemon's kprobes on, armed alone, and off in turns, `batch` at a time,
    for `rounds` rounds (on first, then off first, and so on): under TCG a guest's cycle drifts
    by tens of percent within minutes, and turns cancel the drift. Off: every kprobe disarmed
    (the kernel's own switch) and the daemon stopped (SIGSTOP); armed: the kprobes armed and the
    daemon stopped (the probes' own cost: their records wait in the ring buffer); on: armed and
    the daemon running. Each turn begins once the daemon has been idle for a while: in an on
    turn it has then taken what came while it was stopped (no work of these cycles'), and every
    kind begins from a guest as idle (the first cycles after idling are slower).
    {"on": [cycle()], "armed": [cycle()], "off": [cycle()]}."""
    block = movable_block()
    out = {"on": [], "armed": [], "off": []}

    def turn(kind):
        if kind == "on":
            _write(KPROBES_ENABLED, "1")
            os.kill(pid, signal.SIGCONT)
        else:
            os.kill(pid, signal.SIGSTOP)
            _write(KPROBES_ENABLED, "1" if kind == "armed" else "0")
        until_idle(pid, timeout=10.0)   # every turn begins from a guest left idle alike
    try:
        for r in range(rounds):
            for kind in in_order(r, ("on", "armed", "off")):
                turn(kind)
                out[kind] += _turn_of_cycles(block, batch)
    finally:
        turn("on")
    return out


def restarted_turns(rounds, batch, spec, timed):
    """Cycles with an observer running and not, in turns as in_turns has them, for probes
    that cannot be disarmed (fentry, or bpftrace's kprobe_multi): on, the process started
    (spec: what ready takes) and then idle; off, that process ended, and its programs with it.
    After the first on turn, `timed` cycles more with the kernel timing its programs (what
    probe_time gives). {"on": [cycle()], "off": [cycle()], "timed": probe_time()}."""
    block = movable_block()
    out = {"on": [], "off": []}
    for r in range(rounds):
        for on in in_order(r, (True, False)):
            if on:
                pid = ready(spec["argv"], spec["log"], spec.get("port"), spec.get("says"))["pid"]
                until_idle(pid, timeout=10.0)
            else:
                time.sleep(0.5)   # idle as long as an on turn's start is at least
            out["on" if on else "off"] += _turn_of_cycles(block, batch)
            if on:
                if "timed" not in out:
                    out["timed"] = probe_time(timed, pid)
                _ended(pid, spec["argv"][0])
    return out


def _ended(pid, name, timeout=120):
    """SIGTERM to a child, SIGKILL once KILL_AFTER seconds have passed, then until it has exited
    (its probes detached: each kprobe or trampoline taken away waits for RCU grace periods,
    seconds under TCG); a child that has not exited `timeout` seconds after SIGKILL is a
    failure, with the kernel stack it waits in."""
    os.kill(pid, signal.SIGTERM)
    killed, deadline = False, time.monotonic() + KILL_AFTER
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline and not killed:
            os.kill(pid, signal.SIGKILL)
            killed, deadline = True, time.monotonic() + timeout
        elif time.monotonic() > deadline:
            try:
                stack = _read(f"/proc/{pid}/stack")
            except OSError as e:
                stack = str(e)
            sys.exit(f"bench.guest: {name} (pid {pid}) not ended {timeout} s after SIGKILL; "
                     f"its kernel stack:\n{stack}")
        time.sleep(0.1)


def probe_time(n, pid):
    """n cycles with the kernel timing the BPF programs of process pid (kernel.bpf_stats_enabled
    for the length of the cycles): {"cycles": [cycle()], "run_ns": their programs' time in all,
    "runs": how many runs}. The time of the programs alone, in the thread that cycles: not the
    kprobes' own dispatch, nor what the process does with the events."""
    block = movable_block()
    cycle(block)
    _write(BPF_STATS, "1")
    try:
        before = _program_stats(pid)
        cycles = [cycle(block) for _ in range(n)]
        after = _program_stats(pid)
    finally:
        _write(BPF_STATS, "0")
    return {"cycles": cycles, "run_ns": sum(after[p][0] - before.get(p, (0, 0))[0] for p in after),
            "runs": sum(after[p][1] - before.get(p, (0, 0))[1] for p in after)}


def _program_stats(pid):
    """{BPF program id: (run_time_ns, run_cnt)} of the programs process pid holds open."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            lines = _read(f"/proc/{pid}/fdinfo/{fd}").splitlines()
            info = dict(line.split(":", 1) for line in lines if ":" in line)
        except OSError:   # closed meanwhile
            continue
        if "prog_id" in info and "run_time_ns" in info:
            out[int(info["prog_id"])] = (int(info["run_time_ns"]), int(info["run_cnt"]))
    return out


def _events(port, function):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(
        rf'^memhp_events_total{{[^}}]*function="{function}"[^}}]*}} (\S+)$', text, re.M))


def _journalled(path):
    with open(path) as f:
        return sum(1 for line in f if '"type": "anomaly"' in line or '"type":"anomaly"' in line)


def _until(changed, timeout=10.0):
    """Seconds until changed() is true, looked at as fast as it answers."""
    t = time.monotonic()
    while not changed():
        if time.monotonic() - t > timeout:
            return None
    return time.monotonic() - t


def latency(n, port, journal, inject_dir):
    """After each offline and online of a block returns: the seconds until the daemon's
    /metrics counts the call. Then, with onlining made to fail (memory notifier error
    injection), the seconds until the daemon's journal holds the failure's anomaly."""
    block = movable_block()
    to_metric, to_anomaly = [], []
    for _ in range(n):
        for word, fn in (("offline", "offline_pages"), ("online_movable", "online_pages")):
            before = _events(port, fn)
            _write(f"{MEM}/memory{block}/state", word)
            to_metric.append(_until(lambda: _events(port, fn) > before))
    _write(f"{MEM}/memory{block}/state", "offline")
    _write(f"{inject_dir}/MEM_GOING_ONLINE/error", "-12")
    try:
        for _ in range(n):
            before = _journalled(journal)
            try:
                with open(f"{MEM}/memory{block}/state", "w") as f:
                    f.write("online_movable")
            except OSError:
                pass    # the injected -ENOMEM: the block stays offline
            to_anomaly.append(_until(lambda: _journalled(journal) > before))
    finally:
        _write(f"{inject_dir}/MEM_GOING_ONLINE/error", "0")
        _write(f"{MEM}/memory{block}/state", "online_movable")
    return {"to_metric": to_metric, "to_anomaly": to_anomaly}


def ready(argv, log, port=None, says=None, timeout=300):
    """Start argv (output to log) and time it until ready: /metrics answers on port, or its
    output says `says`. {"pid", "seconds"}."""
    t = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def up():
        if proc.poll() is not None:
            return True
        if port is not None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).close()
                return True
            except OSError:
                return False
        return says in _read(log)
    while not up():
        if time.monotonic() - t > timeout:
            proc.kill()
            sys.exit(f"bench.guest: {argv[0]} not ready after {timeout} s; {log}")
        time.sleep(0.05)
    if proc.poll() is not None:
        sys.exit(f"bench.guest: {argv[0]} exited ({proc.returncode}); {log}")
    return {"pid": proc.pid, "seconds": time.monotonic() - t}


def idle(pid, seconds):
    """The process's CPU time over `seconds` as a share of one core, and its RSS."""
    began, t = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    percent = 100 * (cpu_seconds(pid) - began) / (time.monotonic() - t)
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", _read(f"/proc/{pid}/status")).group(1)) << 10
    return {"percent": percent, "rss_bytes": rss}


def main():
    try:
        require_lab_guest(sys.argv[1])    # it writes hotplug sysfs files
    except NotALabGuest as e:
        sys.exit(f"bench.guest: {e}")
    verb, args = sys.argv[2], sys.argv[3:]
    if verb == "in_turns":
        out = in_turns(int(args[0]), int(args[1]), int(args[2]))
    elif verb == "restarted_turns":
        out = restarted_turns(int(args[0]), int(args[1]), json.loads(args[2]), int(args[3]))
    elif verb == "probe_time":
        out = probe_time(int(args[0]), int(args[1]))
    elif verb == "latency":
        out = latency(int(args[0]), int(args[1]), args[2], args[3])
    elif verb == "ready":
        spec = json.loads(args[0])
        out = ready(spec["argv"], spec["log"], spec.get("port"), spec.get("says"))
    elif verb == "idle":
        out = idle(int(args[0]), float(args[1]))
    else:
        sys.exit(f"bench.guest: unknown verb {verb}")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
