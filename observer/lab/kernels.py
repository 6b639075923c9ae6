"""The lab's one bounded cache directory (scripts/setup-lab.sh fills it) and the kernels in it.

Layout: CACHE/vng (virtme-ng's venv), CACHE/kernels/RELEASE/{boot,lib,usr} (Debian's image and
headers packages unpacked with dpkg -x), CACHE/lab.lock. It lives under /opt because virtme-ng
mounts tmpfs over /var/cache inside the guest, which would hide the modules there."""

import os
import re

CACHE = os.environ.get("MEMHP_LAB_CACHE", "/opt/memhp-lab")
DEFAULT_SERIES = "6.1"


class LabSetupError(Exception):
    pass


def _version_key(release):
    return [int(x) for x in re.findall(r"\d+", release)]


def installed_releases(cache=CACHE):
    d = os.path.join(cache, "kernels")
    if not os.path.isdir(d):
        return []
    return sorted((r for r in os.listdir(d)
                   if os.path.exists(os.path.join(d, r, "boot", f"vmlinuz-{r}"))), key=_version_key)


def find_kernel(release=None, cache=CACHE):
    """(release, vmlinuz) of a release ("6.1.0-57-amd64"), or of the newest kernel of a series
    ("6.12"; default 6.1) in the cache."""
    have = installed_releases(cache)
    if release is None or re.match(r"^\d+\.\d+$", release):
        series = release or DEFAULT_SERIES
        have = [r for r in have if r.startswith(series + ".")]
        if not have:
            raise LabSetupError(f"no Debian {series} kernel in {cache}/kernels: run "
                                f"scripts/setup-lab.sh (--suite trixie for 6.12)")
        release = have[-1]
    elif release not in have:
        raise LabSetupError(f"kernel {release} is not in {cache}/kernels (have: "
                            f"{', '.join(have) or 'none'}): run scripts/setup-lab.sh {release}")
    if not os.path.exists(f"/lib/modules/{release}/modules.dep"):
        raise LabSetupError(f"/lib/modules/{release} is not linked to the cache: run scripts/setup-lab.sh")
    return release, os.path.join(cache, "kernels", release, "boot", f"vmlinuz-{release}")


def vng_path(cache=CACHE):
    path = os.path.join(cache, "vng", "bin", "vng")
    if not os.access(path, os.X_OK):
        raise LabSetupError(f"virtme-ng is not installed in {cache}/vng: run scripts/setup-lab.sh")
    return path
