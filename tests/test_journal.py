"""The anomaly journal (`run --journal`) and journald entries, from outside: the daemon runs on a
copy of the host capture with a leak made in it, is killed with SIGKILL and started again,
the leak is mended and made again; the journal is read back line by line with json, and the
journald entries with journalctl from a real systemd-journald (in a mount namespace of the
test's own, so this machine's /run is untouched)."""

import json
import os
import signal
import subprocess
import textwrap
import time

import pytest

from observer.journald import message_id
from test_daemon import EXE, free_port, judged, observer  # noqa: F401 (a fixture)

LEAK = "sys/devices/system/memory/memory199/state"   # an offline block at Normal's end


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def anomalies(path, kind="zone_span_leak"):
    return [r for r in lines(path) if r["type"] == "anomaly" and r["kind"] == kind]


def start(observer, root, journal):
    return observer("--root", str(root), "--reconcile-interval", "0.3", "--journal", str(journal))


def stop(o):
    code, err = o.stop()
    assert code == 0, err
    return err


def settled(o, kind="zone_span_leak", reads=3):
    """Samples once `reads` more reads are judged (and the anomaly is active, if a kind)."""
    before = o.samples(o.scrape()).get(("memhp_snapshots_total", (("verdict", "judged"),)), 0)
    deadline = time.monotonic() + 30
    while True:
        m = judged(o, kind) if kind else o.samples(o.scrape())
        if m.get(("memhp_snapshots_total", (("verdict", "judged"),)), 0) >= before + reads:
            return m
        assert time.monotonic() < deadline, "the daemon judged no read"
        time.sleep(0.2)


def test_a_restart_in_the_same_boot_says_no_open_anomaly_twice(observer, host_copy, tmp_path):
    (host_copy / LEAK).write_text("offline\n")
    journal = tmp_path / "anomalies.jsonl"
    first = start(observer, host_copy, journal)
    settled(first)
    first.proc.send_signal(signal.SIGKILL)          # no chance to flush anything more
    first.proc.wait()
    [reported] = anomalies(journal)
    assert reported["severity"] == "critical" and reported["standing"] is True
    assert reported["boot_id"] == open("/proc/sys/kernel/random/boot_id").read().strip()
    assert (reported["node"], reported["zone"]) == (0, "Normal")

    again = start(observer, host_copy, journal)
    m = settled(again)
    assert m[("memhp_anomalies_active", (("kind", "zone_span_leak"),))] == 1
    err = stop(again)
    assert "critical zone_span_leak" not in err     # the same anomaly: not said again
    assert "1 anomalies open from earlier in this boot" in err
    assert len(anomalies(journal)) == 1

    # mended while watched: cleared; made again: a new report
    third = start(observer, host_copy, journal)
    settled(third)
    (host_copy / LEAK).write_text("online\n")
    settled(third, kind=None)
    (host_copy / LEAK).write_text("offline\n")
    settled(third)
    err = stop(third)
    records = [r for r in lines(journal) if r["type"] in ("anomaly", "cleared")]
    assert [r["type"] for r in records] == ["anomaly", "cleared", "anomaly"]
    assert records[0]["id"] == records[1]["id"] == records[2]["id"]
    assert err.count("critical zone_span_leak") == 1


def test_a_line_torn_by_a_kill_is_left_alone_and_skipped(observer, host_copy, tmp_path):
    (host_copy / LEAK).write_text("offline\n")
    journal = tmp_path / "anomalies.jsonl"
    o = start(observer, host_copy, journal)
    settled(o)
    stop(o)
    whole = journal.read_text()
    torn = '{"type": "anomaly", "id": "0123456789abcdef", "kind": "resource_le'
    journal.write_text(whole + torn)                # what a kill mid-write leaves
    o = start(observer, host_copy, journal)
    settled(o)
    stop(o)
    text = journal.read_text()
    assert text.startswith(whole + torn + "\n")     # kept, and ended so it stands alone
    after = [json.loads(line) for line in text[len(whole + torn + "\n"):].splitlines()]
    assert not [r for r in after if r["type"] == "anomaly"]   # the leak, active again: said once


def test_a_file_that_is_not_a_journal_is_refused_and_kept(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    out = subprocess.run([EXE, "run", "--listen", f"127.0.0.1:{free_port()}", "--mode", "procfs",
                          "--journal", str(notes)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"memhp-observer: {notes}:1: not a memhp-observer journal: not writing into it "
        f"(name another --journal file)"]
    assert notes.read_text() == "my notes\n"


def test_the_journal_rotates_by_size_and_its_newest_file_knows_what_is_open(tmp_path):
    from observer.journal import Journal
    from observer.model.anomaly import Anomaly
    path = str(tmp_path / "j.jsonl")
    j = Journal(path, "boot-a", max_bytes=2000, keep=2)
    leak = Anomaly("resource_leak", "a leak", 1, start_pfn=0x100, end_pfn=0x200, standing=True)
    j.report(leak)
    for i in range(40):
        j.report(Anomaly("operation_failed", f"offline {i} failed", 10 + i, severity="info"))
    j.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["j.jsonl", "j.jsonl.1", "j.jsonl.2"]
    assert all(os.path.getsize(tmp_path / f) <= 2000 for f in files)
    head = lines(path)[0]
    assert head["type"] == "journal" and list(head["open"].values()) == ["resource_leak"]
    assert Journal(path, "boot-a").known(leak)
    assert not Journal(path, "boot-b").known(leak)   # after a reboot, nothing is open


JOURNALD = textwrap.dedent("""\
    set -e
    # a journald of the test's own: /run/systemd, /run/log and /var/log/journal are tmpfs here
    mount -t tmpfs none /run/systemd && mkdir -p /run/systemd/journal
    mkdir -p /run/log && mount -t tmpfs none /run/log
    [ ! -d /var/log/journal ] || mount -t tmpfs none /var/log/journal
    /lib/systemd/systemd-journald & journald=$!
    while [ ! -S /run/systemd/journal/socket ]; do sleep 0.1; done
    "$EXE" run --listen "127.0.0.1:$PORT" --root "$ROOT" --reconcile-interval 0.3 & observer=$!
    sleep 6
    kill -TERM $observer
    wait $observer
    journalctl -D /run/log/journal -o json SYSLOG_IDENTIFIER=memhp-observer > "$OUT"
    kill $journald
    """)


def test_each_anomaly_is_one_structured_journald_entry(host_copy, tmp_path):
    (host_copy / LEAK).write_text("offline\n")
    out = tmp_path / "journal.json"
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", JOURNALD],
                          env=dict(os.environ, EXE=EXE, ROOT=str(host_copy), OUT=str(out),
                                   PORT=str(free_port())),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [entry] = [e for e in map(json.loads, out.read_text().splitlines())
               if e.get("MEMHP_KIND") == "zone_span_leak"]
    assert entry["MESSAGE_ID"] == message_id("zone_span_leak")
    assert entry["PRIORITY"] == "2" and entry["MEMHP_SEVERITY"] == "critical"
    assert (entry["MEMHP_NODE"], entry["MEMHP_ZONE"]) == ("0", "Normal")
    assert int(entry["MEMHP_START_PFN"]) < int(entry["MEMHP_END_PFN"])
    assert entry["MESSAGE"].startswith("critical zone_span_leak (node 0, Normal, pfn ")
    assert "memory199" in entry["MEMHP_EVIDENCE"] and "\n" in entry["MEMHP_EVIDENCE"]


def replayed(path):
    return subprocess.run([EXE, "replay", str(path)], capture_output=True, text=True, timeout=120)


def test_the_record_rotates_and_reopens_and_every_file_replays_on_its_own(observer, host_copy,
                                                                         tmp_path):
    (host_copy / LEAK).write_text("offline\n")
    trace = tmp_path / "run.jsonl"
    o = observer("--root", str(host_copy), "--reconcile-interval", "0.2", "--record", str(trace),
                 "--record-max-bytes", "30000")
    deadline = time.monotonic() + 60
    while not (tmp_path / "run.jsonl.4").exists():
        assert time.monotonic() < deadline, sorted(p.name for p in tmp_path.iterdir())
        time.sleep(0.2)
    # logrotate's way: move the file away, then SIGHUP; a new one begins at the next read
    moved = tmp_path / "moved.jsonl"
    os.rename(trace, moved)
    o.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not trace.exists():
        assert time.monotonic() < deadline, "no new file after SIGHUP"
        time.sleep(0.2)
    time.sleep(1)
    stop(o)
    assert not (tmp_path / "run.jsonl.5").exists()      # four kept
    for path in [trace, moved] + [tmp_path / f"run.jsonl.{n}" for n in range(1, 5)]:
        first = [json.loads(line) for line in path.read_text().splitlines()[:2]]
        assert [r["type"] for r in first] == ["header", "snapshot"], path
        out = replayed(path)     # each is a trace of its own: the leak is found in it
        assert out.returncode == 1 and "critical zone_span_leak" in out.stdout, (path, out.stderr)
