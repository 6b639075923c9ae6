"""memhp-observer.service under a real systemd: a lab guest boots Debian's 6.12 kernel with its
suite's userland (trixie, from `setup-lab.sh --systemd-root`) as root and that suite's systemd
as init, the unit is installed as systemd/README.md says, and what systemd and the kernel show
is checked: READY with every probe the kernel has attached under the unit's hardening, exactly
the unit's capabilities, a leak journalled once, a hung daemon (SIGSTOP) killed by the watchdog
and restarted without saying that leak again, reload, and a clean stop.

The guest sees this checkout read-only at /opt/memhp-observer, where the unit expects it, but
its venv is this machine's (another Python): a drop-in runs the unit's own command line with
the userland's python3 instead, and shortens the watchdog to 20 s (and the wait after its
SIGABRT, which a stopped process cannot take, to 5 s) to keep the boot short.

Then an event storm (Movable blocks offlined and onlined again and again) with the daemon
killed (SIGKILL) in the middle of it: systemd restarts it, it takes its state from the kernel's
views again and watches a second storm, says nothing false of either and nothing twice of the
leak."""

import json
import os
import re
import shutil
import time

import pytest

from observer.journald import message_id
from observer.lab import kernels
from observer.lab.guest import CHECKOUT_IN_GUEST, Guest
from observer.lab.scenarios import GUEST_APPEND, MEM, OFFLINE_POLICY, action_file
from test_service import UNIT, status_capabilities, unit_capabilities

SERIES = "6.12"
STATE = "/var/lib/memhp-observer"   # StateDirectory=
JOURNAL = f"{STATE}/anomalies.jsonl"
CACHE = "/var/cache/memhp-observer"   # CacheDirectory=
WATCHDOG_SECONDS = 20


def drop_in():
    with open(UNIT) as f:
        [command] = re.findall(r"^ExecStart=(.*)$", f.read(), re.M)
    command = command.replace(f"{CHECKOUT_IN_GUEST}/.venv/bin/memhp-observer",
                              "/usr/bin/python3 -m observer.cli", 1)
    return (f"[Service]\nEnvironment=PYTHONPATH={CHECKOUT_IN_GUEST}\nExecStart=\n"
            f"ExecStart={command}\nWatchdogSec={WATCHDOG_SECONDS}\nTimeoutAbortSec=5\n")


def show(guest):
    out = guest.sh("systemctl show memhp-observer -p ActiveState -p SubState -p StatusText "
                   "-p MainPID -p NRestarts -p Result -p ExecMainStatus")["out"]
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def until(guest, condition, timeout, what):
    began = time.monotonic()
    while guest.sh(condition, check=False)["rc"] != 0:
        if time.monotonic() - began > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(2)


METRICS = ("python3 -c \"import urllib.request; print(urllib.request.urlopen("
           "'http://127.0.0.1:9477/metrics').read().decode())\"")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    results = str(tmp_path_factory.mktemp("service"))
    release, _ = kernels.find_kernel(SERIES)
    root = kernels.systemd_root(release)
    # the guest sees only its root, this checkout and the results directory
    shutil.copy(kernels.lab_module("memhp_faults", release), results)
    seen = {}
    with Guest(results, release=SERIES, systemd_root=root, append=GUEST_APPEND) as guest:
        # the unit's state directory on the guest's own tmpfs, as on a real host's local disk:
        # the guest's root is the cached userland shared from this machine, whose writeback
        # can put the rest of a line a SIGKILL tore after the restarted daemon's next line
        guest.sh(f"mkdir -p {STATE} && mount -t tmpfs -o mode=0755 memhp-state {STATE}")
        # and its cache directory, which a run kept in the userland would leave to the next: its
        # first start here compiles the probes
        guest.sh(f"mkdir -p {CACHE} && mount -t tmpfs -o mode=0755 memhp-cache {CACHE}")
        guest.sh(f"cp {CHECKOUT_IN_GUEST}/systemd/memhp-observer.service /etc/systemd/system/ && "
                 f"cp {CHECKOUT_IN_GUEST}/systemd/memhp-observer.env /etc/default/memhp-observer && "
                 f"mkdir -p /etc/systemd/system/memhp-observer.service.d && "
                 f"cat > /etc/systemd/system/memhp-observer.service.d/lab.conf << 'EOF'\n"
                 f"{drop_in()}EOF\nsystemctl daemon-reload")
        began = time.monotonic()
        guest.sh("systemctl start memhp-observer", timeout=360)   # returns at READY=1
        seen["start_seconds"] = round(time.monotonic() - began, 1)
        seen["started"] = show(guest)
        seen["status"] = guest.sh(f"cat /proc/{seen['started']['MainPID']}/status")["out"]
        seen["metrics"] = guest.sh(METRICS)["out"]
        probed = re.findall(r'^memhp_probe_attached\{function="([^"]+)"', seen["metrics"], re.M)
        seen["kallsyms"] = guest.sh("awk '{print $3}' /proc/kallsyms | cut -d. -f1 | grep -x -F "
                                    + " ".join(f"-e {fn}" for fn in probed) + " | sort -u",
                                    check=False)["out"].split()
        # a leak that stays: System RAM claimed again over a removed block (the fault module)
        guest.sh(f"{OFFLINE_POLICY} && insmod {results}/memhp_faults.ko && "
                 f"echo leak-whole > {action_file('memhp_faults')}")
        until(guest, f"grep -q '\"kind\": \"resource_leak\"' {JOURNAL}", 120, "the leak journalled")
        seen["journal_before"] = guest.sh(f"cat {JOURNAL}")["out"]
        # hung: the main loop stops feeding the watchdog
        guest.sh(f"kill -STOP {seen['started']['MainPID']}")
        began = time.monotonic()
        until(guest, "[ $(systemctl show -p NRestarts --value memhp-observer) = 1 ] && "
                     "systemctl is-active -q memhp-observer", 300, "restarted and READY again")
        seen["restart_seconds"] = round(time.monotonic() - began, 1)
        seen["restarted"] = show(guest)
        time.sleep(15)   # a reconcile (10 s) of the restarted daemon has judged the leak again
        seen["journal_after"] = guest.sh(f"cat {JOURNAL}")["out"]
        seen["unit_log"] = guest.sh("journalctl -u memhp-observer -o cat --no-pager")["out"]
        seen["journald"] = guest.sh(f"journalctl MESSAGE_ID={message_id('resource_leak')} "
                                    f"-o json --no-pager")["out"]
        guest.sh("systemctl reload memhp-observer && sleep 3")
        seen["reloaded"] = show(guest)
        storm(guest, seen)
        guest.sh("systemctl stop memhp-observer", timeout=120)
        seen["stopped"] = show(guest)
    with open(os.path.join(results, "seen.json"), "w") as f:
        json.dump(seen, f, indent=1)
    print(f"service: READY {seen['start_seconds']} s after start; hung to READY again in "
          f"{seen['restart_seconds']} s")
    return seen


STORM_SECONDS = 30
# boot Movable's blocks but its top one (memblock's reserved pages sit there: it never goes)
MOVABLE = (f"grep -l Movable {MEM}/memory*/valid_zones | sed 's|.*/memory\\([0-9]*\\)/.*|\\1|' "
           f"| sort -n | head -n -1 | head -4")


def storm_sh(blocks, seconds):
    """Shell: the blocks offlined and onlined again and again for `seconds`."""
    return (f"end=$((SECONDS + {seconds})); while [ $SECONDS -lt $end ]; do for b in {blocks}; "
            f"do echo offline > {MEM}/memory$b/state; echo online_movable > {MEM}/memory$b/state; "
            f"done; done > /dev/null 2>&1")


def storm(guest, seen):
    """Movable blocks offlined and onlined for STORM_SECONDS, SIGKILL to the daemon while it
    goes on; once systemd has restarted it, the same again under its eyes; then what it says."""
    blocks = " ".join(guest.sh(MOVABLE)["out"].split())
    assert blocks
    done = f"{guest.results}/storm.done"
    guest.sh(f"({storm_sh(blocks, STORM_SECONDS)}; touch {done}) > /dev/null 2>&1 &")
    time.sleep(5)
    seen["storm_killed_while"] = guest.sh(f"[ -e {done} ] && echo over || echo going")["out"].strip()
    guest.sh("systemctl kill -s SIGKILL memhp-observer")
    until(guest, "[ $(systemctl show -p NRestarts --value memhp-observer) = 2 ] && "
                 "systemctl is-active -q memhp-observer", 300, "restarted after SIGKILL")
    until(guest, f"[ -e {done} ]", 300, "the storm over")
    guest.sh(storm_sh(blocks, STORM_SECONDS), timeout=STORM_SECONDS + 120)
    time.sleep(25)   # two reconciles (10 s) after the storm
    seen["storm_blocks"] = blocks.split()
    seen["storm_show"] = show(guest)
    seen["storm_unit_log"] = guest.sh("journalctl -u memhp-observer -o cat --no-pager")["out"]
    seen["storm_journal"] = guest.sh(f"cat {JOURNAL}")["out"]
    seen["storm_metrics"] = guest.sh(METRICS, check=False)["out"]
    seen["storm_online"] = int(guest.sh(f"grep -l '^online' {MEM}/memory*/state | wc -l")["out"])
    seen["storm_zoneinfo"] = guest.sh("cat /proc/zoneinfo")["out"]


def test_the_unit_is_ready_with_every_probe_the_kernel_has(service):
    """READY=1 came (systemctl start returned, the unit is active) with the mode as STATUS, and
    every probed function the guest kernel has (its /proc/kallsyms) is attached: the unit's
    hardening refused bcc nothing."""
    started = service["started"]
    assert (started["ActiveState"], started["SubState"]) == ("active", "running")
    attached = re.findall(r'^memhp_probe_attached\{function="([^"]+)",method="[^"]+"\} (\S+)$',
                          service["metrics"], re.M)
    have = set(service["kallsyms"])
    assert attached and {fn for fn, v in attached if float(v) == 1} == \
        {fn for fn, _ in attached if fn in have}
    n = sum(fn in have for fn, _ in attached)
    assert started["StatusText"] == (f"BPF mode: {n} of {len(attached)} functions attached; "
                                     f"serving /metrics on 127.0.0.1:9477")


def test_the_restarted_daemon_loads_the_program_its_first_start_kept(service):
    """The first start compiles the probes (bcc) and keeps them in the unit's CacheDirectory;
    the two restarts (the watchdog's, the SIGKILL's) load them from there, with no compile, and
    the second watched the storm through them (the storm's test)."""
    log = service["storm_unit_log"]
    assert log.count(f"probes compiled, kept for the next start in {CACHE}\n") == 1
    loaded = re.findall(rf"probes compiled for this kernel before: loaded from "
                        rf"({CACHE}/[^/\s]+\.json)$", log, re.M)
    assert len(loaded) == 2 and len(set(loaded)) == 1


def test_the_daemon_has_exactly_the_units_capabilities(service):
    caps = sorted(unit_capabilities())
    for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert sorted(status_capabilities(service["status"], field)) == caps, field
    assert re.search(r"^NoNewPrivs:\s+1$", service["status"], re.M)
    assert re.search(r"^Seccomp:\s+2$", service["status"], re.M)   # SystemCallArchitectures


def journal_records(text, kills=0):
    """The journal's records. A line torn by a kill mid-write stays, ended by the restarted
    daemon, and is skipped (observer/journal.py): one such line at most per SIGKILL."""
    records, torn = [], []
    for line in filter(str.strip, text.splitlines()):
        try:
            records.append(json.loads(line))
        except ValueError:
            torn.append(line)
    assert len(torn) <= kills, torn
    return records


def test_the_watchdog_restarts_a_hung_daemon(service):
    before, after = service["started"], service["restarted"]
    assert after["NRestarts"] == "1" and after["MainPID"] != before["MainPID"]
    assert (after["ActiveState"], after["SubState"]) == ("active", "running")
    assert after["StatusText"] == before["StatusText"]
    assert "Watchdog timeout" in service["unit_log"]
    assert service["restart_seconds"] >= WATCHDOG_SECONDS


def test_the_leak_is_said_once_across_the_restart(service):
    """The restarted daemon finds the leak open in the journal it appends to and says nothing
    more of it: the journal is as it was, journald has one structured entry, and the unit's
    log has the leak once (an entry journald took is not logged again as text)."""
    before = journal_records(service["journal_before"])
    assert journal_records(service["journal_after"]) == before
    [leak] = [r for r in before if r.get("type") == "anomaly"]
    assert (leak["kind"], leak["severity"], leak["standing"]) == ("resource_leak", "critical", True)
    assert "1 anomalies open from earlier in this boot" in service["unit_log"]
    entries = [json.loads(line) for line in service["journald"].splitlines() if line.strip()]
    assert [e["MEMHP_ID"] for e in entries] == [leak["id"]]
    assert service["unit_log"].count("resource_leak") == 1


def test_reload_and_stop(service):
    reloaded, stopped = service["reloaded"], service["stopped"]
    assert (reloaded["ActiveState"], reloaded["NRestarts"]) == ("active", "1")
    assert reloaded["MainPID"] == service["restarted"]["MainPID"]
    assert (stopped["ActiveState"], stopped["Result"], stopped["ExecMainStatus"]) == \
        ("inactive", "success", "0")


def sample(metrics, name, **labels):
    """Sum of a metric's samples whose labels include these."""
    total = 0.0
    for m in re.finditer(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", metrics, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_a_kill_in_an_event_storm_loses_nothing_and_says_nothing_twice(service):
    """SIGKILL while blocks go offline and online: systemd restarts the daemon, which takes the
    kernel's views as its state and watches the next storm (its metrics equal sysfs and
    /proc/zoneinfo after it), says nothing of either storm above info (healthy hotplug) and
    keeps the leak open, unsaid."""
    assert service["storm_killed_while"] == "going"
    assert "status=9/KILL" in service["storm_unit_log"]
    # the restarted daemon watched the second storm: offlines and onlines, each judged
    for fn in ("offline_pages", "online_pages"):
        assert sample(service["storm_metrics"], "memhp_events_total", function=fn) > 0, fn
    records = journal_records(service["storm_journal"], kills=1)
    before = journal_records(service["journal_before"])
    assert records[:len(before)] == before
    # under TCG the storm outruns the BPF buffer: events_lost (a warning) is the truth then
    assert [r for r in records if r.get("type") == "anomaly" and r["severity"] != "info"
            and r["kind"] != "events_lost"] == [r for r in before if r.get("type") == "anomaly"]
    assert service["storm_show"]["NRestarts"] == "2"     # no crash under the storm
    metrics = service["storm_metrics"]
    assert sample(metrics, "memhp_memory_blocks", state="online") == service["storm_online"]
    movable = re.search(r"zone\s+Movable\n(?:.*\n)*?\s+present\s+(\d+)", service["storm_zoneinfo"])
    assert sample(metrics, "memhp_zone_present_pages", zone="Movable") == int(movable.group(1))
    assert sample(metrics, "memhp_anomalies_active", kind="resource_leak") == 1
    assert sample(metrics, "memhp_anomalies_total", kind="resource_leak") == 0
