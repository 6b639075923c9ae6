"""`memhp-observer run` in procfs mode, end to end: started on a loopback port, scraped, checked
with promtool, measured from outside with psutil, stopped with SIGTERM."""

import signal
import socket
import subprocess
import sys
import time
import os
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import HOST
from observer import snapshot

EXE = os.path.join(os.path.dirname(sys.executable), "memhp-observer")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Observer:
    def __init__(self, *args):
        self.port = free_port()
        self.proc = subprocess.Popen([EXE, "run", "--listen", f"127.0.0.1:{self.port}", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
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

    def start(*args):
        started.append(Observer(*args))
        return started[-1]
    yield start
    for o in started:
        if o.proc.poll() is None:
            o.proc.kill()
            o.proc.wait()


def test_live_host_metrics_match_the_views(observer):
    o = observer("--reconcile-interval", "0.5")
    snap = snapshot.take("/")
    m = o.samples()
    for z in snap.zones:
        labels = (("node", str(z.node)), ("zone", z.name))
        assert m[("memhp_zone_spanned_pages", labels)] == z.spanned
        assert m[("memhp_zone_present_pages", labels)] == z.present
        assert m.get(("memhp_zone_start_pfn", labels)) == z.start_pfn
    blocks = {k: v for k, v in m.items() if k[0] == "memhp_memory_blocks"}
    assert sum(blocks.values()) == len(snap.blocks.blocks)
    ram = sum(r.size for r, _ in snapshot.iomem.walk(snap.resources) if r.name == "System RAM")
    assert m[("memhp_resource_bytes", (("type", "system_ram"),))] == ram
    assert m[("memhp_build_info", (("kernel", os.uname().release), ("mode", "procfs"),
                                   ("version", "0.1.0")))] == 1
    assert m[("memhp_probe_attached", (("function", "arch_add_memory"), ("method", "none")))] == 0
    assert m[("memhp_anomalies_active", (("kind", "zone_span_leak"),))] == 0
    first = m[("memhp_last_reconcile_timestamp_seconds", ())]
    time.sleep(1.2)
    assert o.samples(o.scrape())[("memhp_last_reconcile_timestamp_seconds", ())] > first
    code, err = o.stop()
    assert code == 0
    lines = err.splitlines()
    # one line at start says why BPF is off here
    assert sum("BPF off" in l for l in lines) == 1 and "fentry" in lines[0] and "kprobes" in lines[0]


def test_promtool_is_clean_on_the_exposition(observer):
    o = observer()
    check = subprocess.run(["promtool", "check", "metrics"], input=o.text, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and check.stdout + check.stderr == "", check.stdout + check.stderr
    assert o.stop()[0] == 0


def test_process_metrics_agree_with_psutil_and_llvm_stays_out(observer):
    o = observer()
    rss = psutil.Process(o.proc.pid).memory_info().rss
    exported = o.samples(o.scrape())[("process_resident_memory_bytes", ())]
    assert abs(exported - rss) < 0.2 * rss
    # the fentry try (which loads LLVM, ~180 MB) ran in a child: the daemon stays small
    assert rss < 80 << 20, rss
    assert o.stop()[0] == 0


def test_span_leak_in_the_views_shows_in_metrics(observer, host_copy):
    (host_copy / "sys/devices/system/memory/memory199/state").write_text("offline\n")
    o = observer("--root", str(host_copy))
    m = o.samples()
    assert m[("memhp_anomalies_active", (("kind", "zone_span_leak"),))] == 1
    assert m[("memhp_anomalies_total", (("kind", "zone_span_leak"), ("severity", "critical")))] == 1
    assert m[("memhp_zone_span_leak_pages", (("node", "0"), ("zone", "Normal")))] == 32768
    assert m[("memhp_memory_blocks", (("node", "0"), ("state", "offline"), ("zone", "none")))] == 1
    code, err = o.stop()
    assert code == 0 and "critical zone_span_leak" in err


def test_port_in_use_is_one_line_and_nonzero(observer):
    first = observer()
    second = subprocess.run([EXE, "run", "--listen", f"127.0.0.1:{first.port}"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{first.port}: Address already in use" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.stop()[0] == 0


def test_bad_listen_address_is_a_usage_error():
    out = subprocess.run([EXE, "run", "--listen", "localhost"], capture_output=True, text=True)
    assert out.returncode == 2 and "expected HOST:PORT" in out.stderr
