import os
import shutil

import pytest

from bench.trees import HOST, edit, grow_blocks, host_with_blocks  # noqa: F401  (tests use them)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture
def host_copy(tmp_path):
    """A writable copy of the host capture, for tests that derive a fault from it."""
    dst = tmp_path / "root"
    shutil.copytree(HOST, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def host_10k(tmp_path_factory):
    """The host capture grown to 10,000 memory blocks (a sysfs-shaped tree, generated here)."""
    return host_with_blocks(str(tmp_path_factory.mktemp("host10k") / "root"), 10_000)
