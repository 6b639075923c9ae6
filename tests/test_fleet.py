"""The fleet configuration end to end with Debian's own components on loopback: the example
Prometheus configuration (file-based discovery, the alert rules) scrapes a real observer
watching a tree with a span leak, the rule fires, and the example Alertmanager route delivers
it to the pager receiver, here a local webhook."""

import http.server
import json
import os
import subprocess
import threading
import time
import urllib.request

import pytest
import yaml

from test_daemon import Observer, free_port

FLEET = os.path.join(os.path.dirname(__file__), "..", "dashboards", "fleet")
RULES = os.path.abspath(os.path.join(FLEET, "..", "alerts.yml"))
LEAK = "sys/devices/system/memory/memory199/state"


def test_the_example_configurations_check_clean():
    checked = subprocess.run(["promtool", "check", "config", "prometheus.yml"], cwd=FLEET,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = subprocess.run(["amtool", "check-config", "alertmanager.yml"], cwd=FLEET,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


class Webhook(http.server.BaseHTTPRequestHandler):
    received = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Webhook.received.append((self.path, json.loads(body)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def stop_servers(started):
    """Stop the processes and HTTP servers a test started."""
    for server in started:
        if isinstance(server, http.server.HTTPServer):
            server.shutdown()
            continue
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture
def servers():
    """Processes and HTTP servers a test started, stopped at its end."""
    started = []
    yield started
    stop_servers(started)


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def alerting(tmp_path, target, servers):
    """The example Alertmanager (its route as it is, its receivers pointed at a local webhook,
    its waits short) and the example Prometheus (1 s scrapes and rule evaluations, its targets
    file naming `target`, the alert rules with the leaks' `for: 1m` made 5 s) on loopback;
    returns Prometheus's port. Webhook.received fills. How long each rule holds is
    alerts.test.yml's to test (promtool's virtual time): here it is the way to the pager."""
    Webhook.received = []
    hook = http.server.HTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    with open(os.path.join(FLEET, "alertmanager.yml")) as f:
        am = yaml.safe_load(f)
    for receiver in am["receivers"]:
        for hook_config in receiver.get("webhook_configs", []):
            path = hook_config["url"].split("/", 3)[3]
            hook_config["url"] = f"http://127.0.0.1:{hook.server_port}/{path}"
    for route in [am["route"]] + am["route"]["routes"]:
        route["group_wait"] = "1s"
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(am))
    am_port = free_port()
    servers.append(subprocess.Popen(
        ["prometheus-alertmanager", f"--config.file={tmp_path / 'alertmanager.yml'}",
         f"--storage.path={tmp_path / 'am'}", f"--web.listen-address=127.0.0.1:{am_port}",
         "--cluster.listen-address="], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    with open(os.path.join(FLEET, "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    prom["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    with open(RULES) as f:
        rules = yaml.safe_load(f)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("for") == "1m":
                rule["for"] = "5s"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    prom["rule_files"] = [str(tmp_path / "alerts.yml")]
    prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{am_port}"]
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "lab.json").write_text(json.dumps(
        [{"targets": [target], "labels": {"pool": "test"}}]))
    prom["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(tmp_path / "targets" / "*.json")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom))
    prom_port = free_port()
    servers.append(subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    servers.append(hook)
    return prom_port


def paged(prom_port, alertname, timeout=150):
    """The first notification the pager receiver got for this alert."""
    deadline = time.monotonic() + timeout
    while True:
        pages = [b for path, b in Webhook.received if path == "/memhp/page"
                 and any(a["labels"]["alertname"] == alertname for a in b["alerts"])]
        if pages:
            return pages[0]
        assert time.monotonic() < deadline, get(f"http://127.0.0.1:{prom_port}/api/v1/alerts")
        time.sleep(1)


def test_a_leak_becomes_an_alert_the_pager_receives(host_copy, tmp_path, servers):
    (host_copy / LEAK).write_text("offline\n")
    observer = Observer("--root", str(host_copy), "--reconcile-interval", "1")
    servers.append(observer.proc)
    prom_port = alerting(tmp_path, f"127.0.0.1:{observer.port}", servers)
    body = paged(prom_port, "MemhpZoneSpanLeak")
    [alert] = body["alerts"]
    assert body["receiver"] == "pager" and alert["status"] == "firing"
    assert alert["labels"]["instance"] == f"127.0.0.1:{observer.port}"
    assert (alert["labels"]["pool"], alert["labels"]["severity"]) == ("test", "critical")
    assert alert["annotations"]["runbook_url"] == "dashboards/RUNBOOK.md#memhpzonespanleak"
    # nothing else fired: the observer is up, it lost nothing, its reads return
    firing = get(f"http://127.0.0.1:{prom_port}/api/v1/alerts")["data"]["alerts"]
    assert {a["labels"]["alertname"] for a in firing if a["state"] == "firing"} == {"MemhpZoneSpanLeak"}
