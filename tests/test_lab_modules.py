"""The lab's test modules, built for each of the lab's four kernels with the compiler its headers
were made with (this machine's gcc for its own suite's kernel, else the one in a userland of the
kernel's suite), checked against what the built objects say of themselves: modinfo's vermagic
and the compiler each object file names in its .comment section."""

import os
import re
import subprocess

import pytest

from observer.lab import kernels

SERIES = ("5.10", "6.1", "6.12", "7.2")


def compiler_of(release):
    """gcc's version as the kernel's headers record it (CONFIG_GCC_VERSION 120200 -> "12.2.0")."""
    with open(f"/lib/modules/{release}/build/include/generated/autoconf.h") as f:
        n = int(re.search(r"CONFIG_GCC_VERSION (\d+)", f.read()).group(1))
    return f"{n // 10000}.{n // 100 % 100}.{n % 100}"


def config_says(release, option):
    with open(kernels.config(release)) as f:
        return f"\n{option}=y\n" in "\n" + f.read()


@pytest.mark.parametrize("series", SERIES)
def test_each_kernel_gets_its_modules_from_its_own_compiler(series):
    release, _ = kernels.find_kernel(series)
    ko = kernels.lab_module("memhp_faults", release)
    modules = [ko]
    if config_says(release, "CONFIG_DEVICE_PRIVATE"):
        modules.append(kernels.lab_module("memhp_gpu", release))
    else:   # module/Kbuild leaves it out, and the lab says why
        with pytest.raises(kernels.LabSetupError, match="CONFIG_DEVICE_PRIVATE"):
            kernels.lab_module("memhp_gpu", release)
    for path in modules:
        vermagic = subprocess.run(["modinfo", "-F", "vermagic", path], capture_output=True,
                                  text=True, check=True).stdout.split()[0]
        assert vermagic == release
        comment = subprocess.run(["readelf", "-p", ".comment", path], capture_output=True,
                                 text=True, check=True).stdout
        assert set(re.findall(r"GCC: \(.*?\) (\S+)", comment)) == {compiler_of(release)}
    assert os.path.dirname(ko) == os.path.join(kernels.CACHE, "modules", release)
