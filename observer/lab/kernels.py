"""The lab's one bounded cache directory (scripts/setup-lab.sh fills it) and the kernels in it.

Layout: CACHE/vng (virtme-ng's venv), CACHE/kernels/RELEASE/{boot,lib,usr} (Debian's image and
headers packages unpacked with dpkg -x; from 7.x the image is linux-binary's
lib/modules/RELEASE/vmlinuz), CACHE/userland/SUITE (a debootstrap'd userland of a suite other
than this machine's, for its kernels' compiler; one also boots as a guest's root with systemd as
init), CACHE/modules/RELEASE (the lab's test modules built for a kernel), CACHE/selftests/SERIES,
CACHE/lab.lock. It lives under /opt because virtme-ng mounts tmpfs over /var/cache inside the
guest, which would hide the modules there."""

import glob
import os
import re
import shutil
import subprocess
import tempfile

CACHE = os.environ.get("MEMHP_LAB_CACHE", "/opt/memhp-lab")
DEFAULT_SERIES = "6.1"


class LabSetupError(Exception):
    pass


def _version_key(release):
    return [int(x) for x in re.findall(r"\d+", release)]


def config(release, cache=CACHE):
    """Debian's config of a kernel in the cache: boot/config-RELEASE, or from 7.x (linux-base)
    the modules directory's config."""
    path = _packaged(release, cache, "config")
    if path is None:
        raise LabSetupError(f"no config of {release} in {cache}/kernels: run scripts/setup-lab.sh")
    return path


def _vmlinuz(release, cache):
    """Debian's image: boot/vmlinuz-RELEASE, or from 7.x (linux-binary) the modules directory's
    vmlinuz; None when the cache has neither."""
    return _packaged(release, cache, "vmlinuz")


def _packaged(release, cache, name):
    d = os.path.join(cache, "kernels", release)
    return next((p for p in (os.path.join(d, "boot", f"{name}-{release}"),
                             os.path.join(d, "lib", "modules", release, name))
                 if os.path.exists(p)), None)


def installed_releases(cache=CACHE):
    d = os.path.join(cache, "kernels")
    if not os.path.isdir(d):
        return []
    return sorted((r for r in os.listdir(d) if _vmlinuz(r, cache)), key=_version_key)


def find_kernel(release=None, cache=CACHE):
    """(release, vmlinuz) of a release ("6.1.0-57-amd64"), or of the newest kernel of a series
    ("6.12"; default 6.1) in the cache."""
    have = installed_releases(cache)
    if release is None or re.match(r"^\d+\.\d+$", release):
        series = release or DEFAULT_SERIES
        have = [r for r in have if r.startswith(series + ".")]
        if not have:
            raise LabSetupError(f"no Debian {series} kernel in {cache}/kernels: run "
                                f"scripts/setup-lab.sh (--series {series})")
        release = have[-1]
    elif release not in have:
        raise LabSetupError(f"kernel {release} is not in {cache}/kernels (have: "
                            f"{', '.join(have) or 'none'}): run scripts/setup-lab.sh {release}")
    if not os.path.exists(f"/lib/modules/{release}/modules.dep"):
        raise LabSetupError(f"/lib/modules/{release} is not linked to the cache: run scripts/setup-lab.sh")
    return release, _vmlinuz(release, cache)


def vng_path(cache=CACHE):
    path = os.path.join(cache, "vng", "bin", "vng")
    if not os.access(path, os.X_OK):
        raise LabSetupError(f"virtme-ng is not installed in {cache}/vng: run scripts/setup-lab.sh")
    return path


def systemd_root(release, cache=CACHE):
    """The userland a guest of this kernel boots as its root with systemd as init: the one of
    the kernel's suite that `setup-lab.sh --systemd-root` gave systemd, python3 with bcc and the
    kernel's headers."""
    for userland in sorted(glob.glob(os.path.join(cache, "userland", "*"))):
        if all(os.path.exists(userland + p) for p in (
                "/sbin/init", f"/usr/src/linux-headers-{release}",
                "/usr/lib/python3/dist-packages/bcc", "/opt/memhp-observer")):
            return userland
    raise LabSetupError(f"no userland in {cache}/userland boots {release} with systemd: run "
                        f"scripts/setup-lab.sh --series {'.'.join(release.split('.')[:2])} "
                        f"--systemd-root")


MODULE_SOURCE = os.path.join(os.path.dirname(__file__), "module")


def lab_module(name, release, cache=CACHE):
    """The .ko of one of the lab's test modules (module/NAME.c: memhp_faults, memhp_gpu) for a
    kernel. All of them are built at once and kept in the cache (CACHE/modules/RELEASE), against
    the kernel's own headers with the compiler they were made with: this machine's, when it has
    that gcc; else in a chroot of the userland setup-lab.sh made of the kernel's own suite
    (CACHE/userland/SUITE, holding the kernel's headers package and its gcc); else a clear
    refusal. module/Kbuild leaves out a module the kernel's config cannot have."""
    out = os.path.join(cache, "modules", release)
    ko = os.path.join(out, f"{name}.ko")
    sources = sorted(glob.glob(os.path.join(MODULE_SOURCE, "*.c"))) + \
        [os.path.join(MODULE_SOURCE, "Kbuild")]
    stamp = os.path.join(out, "Kbuild")   # copied in when they were built
    if not (os.path.exists(stamp) and
            all(os.path.getmtime(stamp) >= os.path.getmtime(s) for s in sources)):
        _build_modules(release, sources, out, cache)
    if not os.path.exists(ko):
        raise LabSetupError(f"{name} is not built for {release}: its kernel config lacks what "
                            f"module/Kbuild asks for it (memhp_gpu: CONFIG_DEVICE_PRIVATE)")
    return ko


def _build_modules(release, sources, out, cache):
    build = f"/lib/modules/{release}/build"
    try:
        with open(os.path.join(build, "include", "generated", "autoconf.h")) as f:
            wanted = int(re.search(r"CONFIG_GCC_VERSION (\d+)", f.read()).group(1)) // 10000
    except (OSError, AttributeError):
        raise LabSetupError(f"no headers for {release} at {build}: run scripts/setup-lab.sh") from None
    headers = f"/usr/src/linux-headers-{release}"
    # Debian's headers name their compiler by version (gcc-12, x86_64-linux-gnu-gcc-14)
    if shutil.which(f"gcc-{wanted}") or shutil.which(f"x86_64-linux-gnu-gcc-{wanted}"):
        userland = None
    else:
        userland = next((u for u in sorted(glob.glob(os.path.join(cache, "userland", "*")))
                         if os.path.isdir(u + headers)), None)
        if userland is None:
            raise LabSetupError(f"{release}'s headers were made with gcc-{wanted}, which this "
                                f"machine does not have, and no userland in {cache}/userland "
                                f"holds {headers}: run scripts/setup-lab.sh for its series")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    work = tempfile.mkdtemp(dir=os.path.join(userland, "tmp") if userland else os.path.dirname(out))
    for s in sources:
        shutil.copy(s, work)
    command = (["make", "-C", build, f"M={work}", "modules"] if userland is None else
               _in_chroot(userland, ["make", "-C", headers,
                                     f"M=/{os.path.relpath(work, userland)}", "modules"]))
    made = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if made.returncode != 0:
        shutil.rmtree(work)
        raise LabSetupError(f"building the lab's modules for {release} failed:\n"
                            f"{(made.stdout + made.stderr)[-2000:]}")
    if os.path.isdir(out):
        shutil.rmtree(out)
    shutil.move(work, out)


def _in_chroot(userland, command):
    """A command run in a chroot of `userland`, in a mount namespace of its own: the /proc and
    /dev it needs (objtool reads /proc/self/limits) go away with it."""
    return ["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c",
            'mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && exec chroot "$0" "$@"',
            userland, *command]
