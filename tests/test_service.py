"""systemd/memhp-observer.service and the daemon's side of it: the unit checked by
systemd-analyze (verify, and its offline security rating), systemd's notify protocol spoken to
a socket bound here as systemd binds it (READY=1 with the mode, watchdog pings from the main
loop that stop when the loop stops, STOPPING=1), and the daemon run with exactly the unit's
capabilities (setpriv), as /proc/PID/status shows them."""

import os
import re
import signal
import socket
import subprocess
import time

import pytest

from test_daemon import EXE, observer  # noqa: F401 (a fixture)

UNIT = os.path.join(os.path.dirname(__file__), "..", "systemd", "memhp-observer.service")
VENV = os.path.dirname(os.path.dirname(EXE))


def unit_here(tmp_path):
    """The unit with ExecStart on this checkout's venv (the unit names /opt/memhp-observer)."""
    with open(UNIT) as f:
        text = f.read().replace("/opt/memhp-observer/.venv", VENV)
    path = tmp_path / "memhp-observer.service"
    path.write_text(text)
    return path


def unit_capabilities():
    with open(UNIT) as f:
        return re.search(r"^CapabilityBoundingSet=(.*)$", f.read(), re.M).group(1).split()


def test_systemd_analyze_verifies_the_unit_and_rates_it(tmp_path):
    path = unit_here(tmp_path)
    verified = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                              text=True, timeout=60)
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr
    rated = subprocess.run(["systemd-analyze", "security", "--offline=true", str(path)],
                           capture_output=True, text=True, timeout=60)
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", rated.stdout).group(1))
    print(f"systemd-analyze security: {exposure}")
    assert exposure <= 5.0


def capabilities(pid, field):
    """Capability names of a /proc/PID/status field."""
    with open(f"/proc/{pid}/status") as f:
        return status_capabilities(f.read(), field)


def status_capabilities(status, field):
    """Capability names of a field of /proc/PID/status's text, decoded by libcap's capsh."""
    mask = re.search(rf"^{field}:\s+([0-9a-f]+)$", status, re.M).group(1)
    decoded = subprocess.run(["capsh", f"--decode={mask}"], capture_output=True, text=True,
                             timeout=10).stdout.strip().split("=", 1)[1]
    return [c.upper() for c in decoded.split(",") if c]


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(0.2)
    yield sock, str(tmp_path / "notify")
    sock.close()


def messages(sock, seconds):
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            out.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
    return out


def test_ready_status_watchdog_and_stopping_over_the_notify_socket(observer, notify_socket,
                                                                  host_copy):
    sock, path = notify_socket
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
    o = observer("--root", str(host_copy), "--reconcile-interval", "0.5", env=env)
    said = messages(sock, 3)
    ready = [m for m in said if "READY=1" in m]
    assert len(ready) == 1 and "STATUS=procfs mode (--root); serving /metrics on 127.0.0.1:" in ready[0]
    assert sum("WATCHDOG=1" in m for m in said) >= 4          # every half second
    os.kill(o.proc.pid, signal.SIGSTOP)                       # a hung daemon pings no more
    messages(sock, 0.3)
    assert not [m for m in messages(sock, 2) if "WATCHDOG=1" in m]
    os.kill(o.proc.pid, signal.SIGCONT)
    assert [m for m in messages(sock, 2) if "WATCHDOG=1" in m]
    o.proc.send_signal(signal.SIGTERM)
    assert "STOPPING=1\n" in messages(sock, 2)
    assert o.proc.wait(timeout=10) == 0


def test_the_daemon_runs_with_exactly_the_units_capabilities(observer):
    caps = unit_capabilities()
    assert caps == ["CAP_SYS_ADMIN", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_RESOURCE", "CAP_SYSLOG"]
    bounding = "-all," + ",".join("+" + c[4:].lower() for c in caps)
    o = observer("--mode", "procfs", argv0=("setpriv", f"--bounding-set={bounding}", "--", EXE))
    # what this machine's root may hold at all (some lack CAP_SYS_RESOURCE in their bounding set)
    available = set(capabilities(os.getpid(), "CapBnd"))
    assert sorted(capabilities(o.proc.pid, "CapEff")) == sorted(set(caps) & available)
    # and with them it reads what it needs: /proc/iomem's addresses (CAP_SYS_ADMIN)
    assert [k for k in o.samples() if k[0] == "memhp_resource_bytes"]
    assert o.stop()[0] == 0
