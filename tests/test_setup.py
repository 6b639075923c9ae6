"""The set-up's package decisions, on `apt-cache depends linux-headers-amd64` outputs captured on
this kind of machine:
a fresh machine's stale lists (weeks old), the same lists after `apt-get update`, and trixie's
(through the lab's private apt configuration). Issue 16: a decision taken on the stale lists and
taken again after the update installed one headers package and looked for another."""

import os
import subprocess

import pytest

from conftest import FIXTURES

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pick_headers(capture):
    with open(os.path.join(FIXTURES, "apt", capture)) as f:
        out = subprocess.run(["bash", "-c", f". {TOP}/scripts/apt.sh && pick_headers"], stdin=f,
                             capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("capture, chosen", [
    ("bookworm-stale.txt", "linux-headers-6.1.0-50-amd64"),   # what the stale lists offer
    ("bookworm-fresh.txt", "linux-headers-6.1.0-57-amd64"),   # its own series, not 6.12 backports
    ("trixie.txt", "linux-headers-6.12.118+deb13-amd64"),     # though 6.1 headers are installed
])
def test_headers_are_the_suites_own_kernels(capture, chosen):
    assert pick_headers(capture) == chosen


def test_setup_decides_once_on_fresh_lists():
    # the headers package is chosen once, after apt_fresh, and that same choice is linked
    with open(os.path.join(TOP, "scripts", "setup.sh")) as f:
        text = f.read()
    assert text.count("pick_headers") == 1
    assert text.index("apt_fresh") < text.index("pick_headers")
    assert "apt-get update" not in text        # only through apt_fresh, never a second time
