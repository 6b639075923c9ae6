"""The lab for real: one Debian 6.1 guest under QEMU/TCG runs every scenario (one boot), and the
captured truth around each step shows that the hotplug path really happened."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from observer import snapshot
from observer.lab import kernels, session
from observer.lab.guest import Guest, LabError
from observer.views import iomem

EXE = os.path.join(os.path.dirname(sys.executable), "memhp-observer")


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    # under /tmp: the guest sees the host's /tmp through --rwdir
    results = str(tmp_path_factory.mktemp("lab"))
    summary = session.run(results, ["kmem"])
    return results, summary


def view(results, scenario, step):
    return snapshot.take(os.path.join(results, "captures", scenario, step))


def kmem_ram(snap):
    return [(r, p) for r, p in iomem.walk(snap.resources) if r.name == "System RAM (kmem)"]


def blocks_in(snap, res):
    size = snap.blocks.block_size
    return [b for b in snap.blocks.blocks if res.start <= b.index * size <= res.end]


def qemu_of(results):
    return [p for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and "qemu" in p.info["cmdline"][0]
            and any(results in a for a in p.info["cmdline"])]


def test_every_capture_checks_clean(lab):
    results, summary = lab
    assert summary["kernel"].startswith("6.1.")
    assert len(summary["checks"]) == 7
    assert {k: v for k, v in summary["checks"].items() if v} == {}


def test_kmem_system_ram_appears_offline_then_online_then_goes(lab):
    results, _ = lab
    assert kmem_ram(view(results, "kmem", "02-devdax")) == []
    added = view(results, "kmem", "03-system-ram")
    [(res, parent)] = kmem_ram(added)
    assert parent.name == "dax0.0" and iomem.resource_type(parent, None) == "driver_parent"
    new = blocks_in(added, res)
    assert len(new) == res.size // added.blocks.block_size and new
    assert {b.state for b in new} == {"offline"}          # Debian 6.1: hot-added memory stays offline
    online = view(results, "kmem", "04-online")
    assert {blocks_in(online, res)[0].state} == {"online"}
    assert all(b.zone == "Movable" for b in blocks_in(online, res))
    movable = [z for z in online.zones if z.name == "Movable"][0]
    assert movable.present == res.size // 4096
    offline = view(results, "kmem", "05-offline")
    assert {b.state for b in blocks_in(offline, res)} == {"offline"}
    assert [z for z in offline.zones if z.name == "Movable"][0].spanned == 0  # shrank at offline
    gone = view(results, "kmem", "06-devdax-again")
    assert kmem_ram(gone) == [] and blocks_in(gone, res) == []
    assert len(gone.blocks.blocks) == len(view(results, "kmem", "00-start").blocks.blocks)


def test_steps_are_recorded_with_the_tools_own_json(lab):
    results, _ = lab
    with open(os.path.join(results, "steps.jsonl")) as f:
        steps = [json.loads(l) for l in f]
    devdax = [s for s in steps if s["step"] == "devdax"][0]
    assert json.loads(devdax["out"])["mode"] == "devdax"
    assert all(s["rc"] == 0 for s in steps)
    with open(os.path.join(results, "captures/kmem/03-system-ram/dmesg.txt")) as f:
        assert f.read().strip()


def test_agent_refuses_outside_a_lab_guest(tmp_path):
    (tmp_path / "lab-token").write_text("0123\n")
    out = subprocess.run([sys.executable, "-m", "observer.lab.agent", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "not a memhp-observer lab guest" in out.stderr
    assert not (tmp_path / "ready").exists()


def test_one_guest_at_a_time(tmp_path):
    import fcntl
    with open(os.path.join(kernels.CACHE, "lab.lock"), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LabError, match="one guest at a time"):
            with Guest(str(tmp_path)):
                pass


def test_unknown_kernel_is_a_clear_error(tmp_path):
    out = subprocess.run([EXE, "lab", "--kernel", "9.9.9-1-amd64", "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "kernel 9.9.9-1-amd64 is not in" in out.stderr


def test_boot_that_hangs_is_stopped_with_its_console(tmp_path):
    results = str(tmp_path)
    with pytest.raises(LabError, match="not ready after 3 s; console: .*console.log"):
        with Guest(results, boot_timeout=3):
            pass
    assert os.path.exists(os.path.join(results, "console.log"))
    assert qemu_of(results) == []


def test_sigterm_to_the_runner_stops_the_guest(tmp_path):
    results = str(tmp_path)
    runner = subprocess.Popen([EXE, "lab", "--scenario", "kmem", "--results", results],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not os.path.exists(os.path.join(results, "ready")) and time.monotonic() < deadline:
        assert runner.poll() is None, runner.communicate()
        time.sleep(0.5)
    assert qemu_of(results), "no QEMU running for the guest"
    runner.send_signal(signal.SIGTERM)
    out, err = runner.communicate(timeout=120)
    assert runner.returncode == 130 and "interrupted; guest stopped" in err
    assert "Linux version" in open(os.path.join(results, "console.log"), errors="replace").read()
    assert qemu_of(results) == []
