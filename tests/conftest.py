import os
import shutil

import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# Captured from the project's dev host (Debian 12 userland, non-Debian 6.18 kernel, 24 GiB) with
# `memhp-observer capture -o tests/fixtures/host-6.18`.
HOST = os.path.join(FIXTURES, "host-6.18")


@pytest.fixture
def host_copy(tmp_path):
    """A writable copy of the host capture, for tests that derive a fault from it."""
    dst = tmp_path / "root"
    shutil.copytree(HOST, dst, symlinks=True)
    return dst


def edit(root, relpath, old, new, count=1):
    """Replace old by new in one captured file; fails loudly if the capture has no such text."""
    path = os.path.join(root, relpath.lstrip("/"))
    with open(path) as f:
        text = f.read()
    assert old in text, f"{old!r} not in {path}"
    with open(path, "w") as f:
        f.write(text.replace(old, new, count))
    return path
