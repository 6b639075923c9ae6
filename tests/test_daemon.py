"""`memhp-observer run` end to end: started on a loopback port, scraped, compared with
node_exporter and lsmem, checked with promtool, measured from outside with psutil, stopped with
SIGTERM."""

import functools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import os
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import HOST

EXE = os.path.join(os.path.dirname(sys.executable), "memhp-observer")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Observer:
    def __init__(self, *args, argv0=(EXE,), env=None, host="127.0.0.1"):
        self.port = free_port()
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.proc = subprocess.Popen([*argv0, "run", "--listen", self.address, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.text = self.scrape()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise AssertionError(f"daemon did not serve: {self.proc.communicate()}")
                time.sleep(0.1)

    def scrape(self):
        with urllib.request.urlopen(f"http://{self.address}/metrics", timeout=5) as r:
            return r.read().decode()

    def samples(self, text=None):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text or self.text) for s in f.samples}

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, err


@pytest.fixture
def observer(request):
    started = []

    def start(*args, **kwargs):
        started.append(Observer(*args, **kwargs))
        return started[-1]
    yield start
    for o in started:
        if o.proc.poll() is None:
            o.proc.kill()
            o.proc.wait()


@pytest.fixture
def node_exporter():
    """Debian's node_exporter with only its zoneinfo collector, on a loopback port."""
    port = free_port()
    proc = subprocess.Popen(["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{port}",
                             "--collector.disable-defaults", "--collector.zoneinfo"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
            break
        except OSError:
            assert time.monotonic() < deadline, "node_exporter did not serve"
            time.sleep(0.1)
    yield {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    proc.kill()
    proc.wait()


def lsmem_blocks():
    """{(node, zone, state): blocks} as util-linux lsmem counts them."""
    out = json.loads(subprocess.run(["lsmem", "-J", "-o", "RANGE,STATE,BLOCK,NODE,ZONES"],
                                    capture_output=True, text=True, timeout=30).stdout)
    counts = {}
    for r in out["memory"]:
        first, _, last = r["block"].partition("-")
        zone = r["zones"] if r["state"] == "online" and r["zones"] != "None" else "none"
        key = (str(r["node"]), zone, r["state"])
        counts[key] = counts.get(key, 0) + int(last or first) - int(first) + 1
    return counts


def test_live_host_metrics_match_node_exporter_and_lsmem(observer, node_exporter):
    o = observer("--reconcile-interval", "0.5")
    m = o.samples()
    zones = [k for k in node_exporter if k[0] == "node_zoneinfo_spanned_pages"]
    assert zones
    for _, labels in zones:     # the same labels, so the series join
        for name in ("spanned_pages", "present_pages"):
            assert m[(f"memhp_zone_{name}", labels)] == node_exporter[(f"node_zoneinfo_{name}", labels)]
    blocks = {(dict(k[1])["node"], dict(k[1])["zone"], dict(k[1])["state"]): v
              for k, v in m.items() if k[0] == "memhp_memory_blocks"}
    assert blocks == lsmem_blocks()
    with open("/sys/devices/system/memory/auto_online_blocks") as f:
        assert m[("memhp_auto_online_blocks", (("policy", f.read().strip()),))] == 1
    # BPF mode where this kernel has kprobes (its kprobe PMU), else procfs with the reason
    kprobes = os.path.exists("/sys/bus/event_source/devices/kprobe")
    mode = "bpf" if kprobes else "procfs"
    assert m[("memhp_build_info", (("kernel", os.uname().release), ("mode", mode),
                                   ("version", "0.1.0")))] == 1
    assert m[("memhp_probe_attached", (("function", "arch_add_memory"),
                                       ("method", "kprobe" if kprobes else "none")))] == int(kprobes)
    assert m[("memhp_anomalies_active", (("kind", "zone_span_leak"),))] == 0
    first = m[("memhp_last_reconcile_timestamp_seconds", ())]
    time.sleep(1.2)
    assert o.samples(o.scrape())[("memhp_last_reconcile_timestamp_seconds", ())] > first
    code, err = o.stop()
    assert code == 0
    if not kprobes:   # one line at start says why BPF is off here
        lines = err.splitlines()
        assert sum("BPF off" in l for l in lines) == 1 and "fentry" in lines[0] and "kprobes" in lines[0]


def test_procfs_mode_tries_no_probes(observer):
    o = observer("--mode", "procfs")
    code, err = o.stop()
    assert code == 0 and "procfs mode (--mode procfs)" in err and "BPF" not in err
    assert o.samples()[("memhp_build_info", (("kernel", os.uname().release), ("mode", "procfs"),
                                             ("version", "0.1.0")))] == 1


def test_bpf_mode_that_cannot_attach_is_one_line_and_exit_1():
    if os.path.exists("/sys/bus/event_source/devices/kprobe"):
        pytest.skip("this kernel has kprobes: --mode bpf attaches (the lab tests that)")
    out = subprocess.run([EXE, "run", "--mode", "bpf", "--listen", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "--mode bpf: no kprobes in this kernel; fentry" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_asked_for_fentry_where_the_kernel_refuses_it_is_one_line_and_exit_1():
    from observer.probes.availability import try_fentry
    if try_fentry(timeout=120)[0]:
        pytest.skip("this kernel loads fentry programs: the lab's benchmark runs the daemon so")
    out = subprocess.run([EXE, "run", "--mode", "bpf", "--probe-method", "kfunc", "--listen",
                          f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=300)
    said = out.stderr.strip().splitlines()
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert said[-1].startswith("memhp-observer: --mode bpf: no probe attached: ") and \
        "fentry: the kernel refuses fentry programs (EPERM)" in said[-1], said


def test_promtool_is_clean_on_the_exposition(observer):
    o = observer()
    check = subprocess.run(["promtool", "check", "metrics"], input=o.text, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and check.stdout + check.stderr == "", check.stdout + check.stderr
    assert o.stop()[0] == 0


def test_exposition_reads_as_prometheus_clients_own(host_copy, monkeypatch):
    """The daemon writes the text format itself: prometheus_client's generate_latest, given the
    same families, writes what parses to the same families, samples and values (an anomaly
    present, and label values that need escaping); its process collector, the same process_*
    families as the daemon's own."""
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
    from prometheus_client.metrics_core import Metric
    from observer import daemon as daemon_module
    from observer.metrics import StateCollector, exposition

    (host_copy / "sys/devices/system/memory/memory199/state").write_text("offline\n")
    (host_copy / "proc/sys/kernel/osrelease").write_text('6.18.0-"odd\\name\n')
    served = []
    monkeypatch.setattr(daemon_module, "serve", lambda host, port, collectors: served.append(collectors))
    d = daemon_module.Daemon(root=str(host_copy), interval=0.3, mode="procfs")
    assert d.start("127.0.0.1", 0)
    loop = threading.Thread(target=d.loop)
    loop.start()
    deadline = time.monotonic() + 30   # a read in the model's first second is not judged
    while not d.current.anomalies and time.monotonic() < deadline:
        time.sleep(0.1)
    d.stop.set()
    loop.join()
    class AsPrometheusClients:
        def collect(self):
            for family in StateCollector(d).collect():
                metric = Metric(family.name, family.documentation, family.type)
                for name, labels, value in family.samples:
                    metric.add_sample(name, labels, value)
                yield metric

    registry = CollectorRegistry()
    registry.register(AsPrometheusClients())
    ProcessCollector(registry=registry)

    def families(text):
        # process figures and how long the block has been offline move between the two calls
        moving = ("process_", "memhp_memory_block_offline_seconds")
        return {f.name: (f.type, f.documentation,
                         sorted((s.name, sorted(s.labels.items()),
                                 None if f.name.startswith(moving) else s.value) for s in f.samples))
                for f in text_string_to_metric_families(text.decode())}
    for _ in range(20):   # a reconcile may still run: compare where none ended in between
        theirs, ours, again = (generate_latest(registry), exposition(served[0]),
                               generate_latest(registry))
        if families(theirs) == families(again):
            break
        time.sleep(0.1)
    assert families(ours) == families(theirs)

    def process_values(text):
        return {f.name: f.samples[0].value for f in text_string_to_metric_families(text.decode())
                if f.name.startswith("process_")}
    mine, client = process_values(ours), process_values(theirs)
    assert mine["process_max_fds"] == client["process_max_fds"]
    assert abs(mine["process_start_time_seconds"] - client["process_start_time_seconds"]) < 0.05
    assert abs(mine["process_cpu_seconds"] - client["process_cpu_seconds"]) < 1
    assert abs(mine["process_open_fds"] - client["process_open_fds"]) <= 2
    for memory in ("process_resident_memory_bytes", "process_virtual_memory_bytes"):
        assert 0.8 < mine[memory] / client[memory] < 1.25
    assert ('kernel="6.18.0-\\"odd\\\\name"' in ours.decode()
            and families(ours)["memhp_anomalies_active"][2].count(
                ("memhp_anomalies_active", [("kind", "zone_span_leak")], 1.0)) == 1)


def test_a_burst_of_uevents_is_read_once_a_settle_time_then_once_settled(host_copy, monkeypatch):
    """A test cycling a block makes uevents back to back: the daemon reads at the first, then
    once a settle time (1.5 s) at most while they come, then once they have settled, and
    judges that read; not a read per wakeup, each taking locks the hotplug would use."""
    from observer import daemon as daemon_module
    from observer.uevents import HandedUevents
    handed = HandedUevents()
    monkeypatch.setattr(daemon_module, "LiveSource",
                        functools.partial(daemon_module.LiveSource, uevents=handed))
    monkeypatch.setattr(daemon_module, "serve", lambda host, port, collectors: None)
    d = daemon_module.Daemon(root=str(host_copy), interval=86400, mode="procfs")
    assert d.start("127.0.0.1", 0)
    reads, read_views = [], d.source.read_views
    d.source.read_views = lambda: reads.append(time.monotonic()) or read_views()
    loop = threading.Thread(target=d.loop)
    loop.start()
    try:
        began = time.monotonic()
        while True:
            handed.hand("offline" if len(handed.waiting) % 2 else "online", 199)
            last = time.monotonic()
            if last - began >= 3.2:
                break
            time.sleep(0.05)
        judged = d.model.snapshots["judged"]
        time.sleep(3)
    finally:
        d.stop.set()
        loop.join()
    during = [t for t in reads if began <= t <= last]
    after = [t - last for t in reads if t > last]
    assert 1 <= len(during) <= 3, [round(t - began, 2) for t in reads]
    assert after and after[-1] >= 1.45 and d.model.snapshots["judged"] > judged


def test_a_client_that_stalls_or_hangs_up_does_not_stop_scrapes(observer):
    o = observer()
    stalled = socket.create_connection(("127.0.0.1", o.port))   # says nothing
    with socket.create_connection(("127.0.0.1", o.port)) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")      # hangs up mid-request
    assert "memhp_build_info" in o.scrape()
    stalled.close()
    code, err = o.stop()
    assert code == 0 and "Traceback" not in err


def test_serves_on_ipv6_loopback(observer):
    o = observer(host="::1")
    assert "memhp_build_info" in o.text and o.stop()[0] == 0


def test_process_metrics_agree_with_psutil_and_llvm_stays_out(observer):
    o = observer()
    rss = psutil.Process(o.proc.pid).memory_info().rss
    exported = o.samples(o.scrape())[("process_resident_memory_bytes", ())]
    assert abs(exported - rss) < 0.2 * rss
    # without kprobes the fentry try (which loads LLVM, ~180 MB) runs in a child: a refusal
    # leaves the daemon small (with kprobes it loads the probes, and LLVM, by design)
    if not os.path.exists("/sys/bus/event_source/devices/kprobe"):
        assert rss < 80 << 20, rss
    assert o.stop()[0] == 0


def judged(o, kind, timeout=15):
    """The samples once an anomaly of this kind is active: procfs mode judges a read only when
    the one before it agrees, and not in the observer's first second."""
    deadline = time.monotonic() + timeout
    while True:
        m = o.samples(o.scrape())
        if m.get(("memhp_anomalies_active", (("kind", kind),))) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def test_span_leak_in_the_views_shows_in_metrics(observer, host_copy, tmp_path):
    (host_copy / "sys/devices/system/memory/memory199/state").write_text("offline\n")
    trace = tmp_path / "run.jsonl"
    o = observer("--root", str(host_copy), "--reconcile-interval", "0.5", "--record", str(trace))
    m = judged(o, "zone_span_leak")
    assert m[("memhp_anomalies_active", (("kind", "zone_span_leak"),))] == 1
    assert m[("memhp_snapshots_total", (("verdict", "judged"),))] >= 1
    assert m[("memhp_anomalies_total", (("kind", "zone_span_leak"), ("severity", "critical")))] == 1
    assert m[("memhp_zone_span_leak_pages", (("node", "0"), ("zone", "Normal")))] == 32768
    assert m[("memhp_memory_blocks", (("node", "0"), ("state", "offline"), ("zone", "none")))] == 1
    code, err = o.stop()
    assert code == 0 and "critical zone_span_leak" in err
    # what run recorded, replay judges the same: the same anomaly, said the same way
    said = [line.split(": ", 1)[1] for line in err.splitlines() if ": critical " in line]
    replayed = subprocess.run([EXE, "replay", str(trace)], capture_output=True, text=True,
                              timeout=60)
    assert replayed.returncode == 1
    assert [line for line in replayed.stdout.splitlines() if line.startswith("critical")] == said


def test_a_block_left_offline_is_timed_from_when_it_was_seen(observer, host_copy):
    # hot-added memory nobody onlined: memhp_memory_block_offline_seconds grows, never past the
    # daemon's own age (psutil), and goes once the block is online
    (host_copy / "sys/devices/system/memory/memory120/state").write_text("offline\n")
    o = observer("--root", str(host_copy), "--reconcile-interval", "0.3")
    key = ("memhp_memory_block_offline_seconds", (("node", "0"),))
    first = o.samples(o.scrape())[key]
    time.sleep(1)
    second = o.samples(o.scrape())[key]
    age = time.time() - psutil.Process(o.proc.pid).create_time()
    assert 0 <= first < second <= age
    (host_copy / "sys/devices/system/memory/memory120/state").write_text("online\n")
    deadline = time.monotonic() + 10
    while key in o.samples(o.scrape()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert o.stop()[0] == 0


def test_port_in_use_is_one_line_and_nonzero(observer):
    first = observer()
    second = subprocess.run([EXE, "run", "--listen", f"127.0.0.1:{first.port}"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{first.port}: Address already in use" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.stop()[0] == 0


def test_strict_makes_a_missing_core_probe_fatal(tmp_path):
    """This machine's kernel has no kprobes (no kprobe PMU, no kprobe_events) and refuses
    fentry: plain `run` serves in procfs mode, `run --strict` and `record --strict` exit 1 in one
    line (record leaves no file); --strict with --mode procfs is a usage error."""
    assert not any(os.path.exists(p) for p in ("/sys/bus/event_source/devices/kprobe",
                                                "/sys/kernel/tracing/kprobe_events"))
    run = subprocess.run([EXE, "run", "--strict", "--listen", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        "memhp-observer: --strict: no kprobes in this kernel; fentry ")
    out = tmp_path / "t.jsonl"
    record = subprocess.run([EXE, "record", "--strict", "-o", str(out), "--duration", "1"],
                            capture_output=True, text=True, timeout=180)
    assert record.returncode == 1 and not out.exists(), record.stderr
    [line] = [ln for ln in record.stderr.splitlines() if ln.startswith("memhp-observer record:")]
    assert line.startswith("memhp-observer record: --strict: ") and "Traceback" not in record.stderr
    for verb in (["run"], ["record", "-o", str(out)]):
        usage = subprocess.run([EXE, *verb, "--strict", "--mode", "procfs"], capture_output=True,
                               text=True, timeout=60)
        assert usage.returncode == 2 and "--strict needs the probes" in usage.stderr


def test_bad_listen_address_is_a_usage_error():
    out = subprocess.run([EXE, "run", "--listen", "localhost"], capture_output=True, text=True)
    assert out.returncode == 2 and "expected HOST:PORT" in out.stderr
