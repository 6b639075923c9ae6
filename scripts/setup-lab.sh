#!/usr/bin/env bash
# Lab set-up (called by scripts/test.sh; idempotent, seconds when all is there). Runs as root.
# usage: setup-lab.sh [--series SERIES] [--systemd-root] [KERNEL_RELEASE]
#   SERIES: 6.1 (default, from bookworm), 6.12 (from trixie), 5.10 (from bullseye) or 7.2 (from
#     unstable)
#   --systemd-root: the series' userland (below) also boots as a guest's root with systemd as
#     init, holding systemd, python3 and the observer's Debian dependencies (the service test)
#   KERNEL_RELEASE: default the series' newest, e.g. 6.1.0-57-amd64, 6.12.118+deb13-amd64,
#     7.2.13+deb14-amd64
# Installs qemu-system-x86, busybox-static, ndctl, daxctl, kmod, bc (the selftest uses it); puts virtme-ng and the guest
# kernel (Debian's image and headers packages, unpacked) in one cache directory, and links the
# kernel's modules into /lib/modules/RELEASE so the guest, which shares this root, finds them.
# For the lab's test modules: make and the kernel's gcc here, or, for a kernel of another suite, a
# debootstrap'd userland of that suite in the cache with make and the kernel's headers.
set -euo pipefail
series=6.1
if [ "${1:-}" = --series ]; then series=$2; shift 2; fi
systemd_root=false
if [ "${1:-}" = --systemd-root ]; then systemd_root=true; shift; fi
case $series in   # each series from the Debian suite whose own kernel it is
  6.1) suite=bookworm ;; 6.12) suite=trixie ;; 5.10) suite=bullseye ;; 7.2) suite=unstable ;;
  *) echo "setup-lab: unknown series $series (6.1, 6.12, 5.10, 7.2)" >&2; exit 1 ;;
esac
cache=${MEMHP_LAB_CACHE:-/opt/memhp-lab}   # not under /var/cache: virtme-ng hides that in the guest
min_free_mb=3072
say() { echo "setup-lab: $*" >&2; }
[ "$(id -u)" = 0 ] || { say "must run as root"; exit 1; }
. "$(dirname "$0")/apt.sh"
host_apt_stamp=/var/lib/apt/periodic/memhp-update-stamp   # the same stamp as setup.sh

mkdir -p "$cache"
free_mb=$(df -Pm "$cache" | awk 'NR==2{print $4}')
if [ "$free_mb" -lt "$min_free_mb" ]; then
  say "only ${free_mb} MiB free on $(df -P "$cache" | awk 'NR==2{print $6}'); the lab needs ${min_free_mb} MiB. Free some space (or trim $cache/kernels) and retry."
  exit 1
fi

# host_install PACKAGE...: those of them not installed yet, from this machine's own suite
host_install() {
  local missing=() p
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -gt 0 ] || return 0
  say "installing ${missing[*]}"
  apt_fresh "$host_apt_stamp"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
host_install qemu-system-x86 busybox-static ndctl daxctl kmod bc

# vng runs `virtme-run` by name: the lab puts this venv's bin on PATH.
if [ ! -x "$cache/vng/bin/vng" ]; then
  say "installing virtme-ng into $cache/vng"
  /usr/bin/python3 -m venv "$cache/vng"
  "$cache/vng/bin/pip" install -q --disable-pip-version-check virtme-ng 2>&1 \
    | { grep -v "^WARNING: Location 'file:" || true; }
fi

# The suite's packages, through a private apt configuration when this machine runs another suite
# (DESIGN.md §5): the host itself never switches suites.
apt_opts=()
apt_stamp=$host_apt_stamp
. /etc/os-release
if [ "${VERSION_CODENAME:-}" != "$suite" ]; then
  conf=$cache/apt/$suite
  apt_opts=(-o Dir::Etc::sourcelist=/dev/null -o Dir::Etc::sourceparts="$conf/sources.list.d"
            -o Dir::State::Lists="$conf/lists")
  apt_stamp=$conf/updated
  if [ ! -e "$conf/sources.list.d/$suite.sources" ]; then
    mkdir -p "$conf/sources.list.d" "$conf/lists/partial"
    src=/etc/apt/sources.list.d/debian.sources
    [ -e "$src" ] || { say "no $src to derive $suite's sources from"; exit 1; }
    # this machine's suites renamed (bookworm-updates -> trixie-updates); unstable has neither
    # -updates nor -security, so a stanza left with no suite goes
    awk -v from="$VERSION_CODENAME" -v to="$suite" 'BEGIN { RS = ""; ORS = "\n\n" }
      { out = ""; keep = 1; n = split($0, line, "\n")
        for (i = 1; i <= n; i++) {
          if (line[i] ~ /^Suites:/) {
            m = split(substr(line[i], 8), names, " "); line[i] = "Suites:"; kept = 0
            for (j = 1; j <= m; j++) {
              name = names[j]; sub("^" from, to, name)
              if (to == "unstable" && name != to) continue
              line[i] = line[i] " " name; kept++
            }
            if (!kept) keep = 0
          }
          out = out (i > 1 ? "\n" : "") line[i]
        }
        if (keep) print out }' "$src" > "$conf/sources.list.d/$suite.sources"
  fi
  # the registry's unstable Release file can be past its Valid-Until
  [ "$suite" != unstable ] || apt_opts+=(-o Acquire::Check-Valid-Until=false)
fi
[ -z "${conf:-}" ] || [ -e "$apt_stamp" ] || say "apt update for $suite (private configuration in $conf)"
apt_fresh "$apt_stamp" "${apt_opts[@]}"

newest_image() {   # the series' newest signed amd64 image in the suite: 6.1.0-57-amd64, 6.12.118+deb13-amd64
  apt-cache "${apt_opts[@]}" search --names-only "^linux-image-${series//./\\.}[.-][^ ]*-amd64\$" \
    | awk '{print $1}' | grep -vE -- '-(dbg|unsigned)$|cloud|-rt-' | sed 's/^linux-image-//' \
    | sort -V | tail -1
}
release=${1:-}
if [ -z "$release" ]; then
  # the ABI number moves between weeks (6.1.0-56 -> -57): look it up, never write it down
  release=$(newest_image)
  [ -n "$release" ] || { say "no linux-image-$series.*-amd64 in $suite's apt sources"; exit 1; }
fi

kdir=$cache/kernels/$release
if [ ! -e "$kdir/.complete" ]; then
  say "fetching Debian kernel $release into $kdir"
  rm -rf "$kdir" && mkdir -p "$kdir/debs"
  # the headers' -common package; from 7.x the image package is empty and depends on
  # linux-binary-RELEASE (the vmlinuz, in usr/lib/modules/RELEASE), linux-modules-RELEASE and
  # linux-base-RELEASE (modules.builtin, without which modprobe misses built-in modules)
  parts=$(apt-cache "${apt_opts[@]}" depends "linux-image-$release" "linux-headers-$release" 2>/dev/null \
          | awk -v r="$release" '$1 == "Depends:" && ($2 ~ /^linux-headers-.*-common$/ ||
                $2 == "linux-binary-" r || $2 == "linux-modules-" r || $2 == "linux-base-" r) {print $2}' \
          | sort -u)
  (cd "$kdir/debs" && apt-get "${apt_opts[@]}" download -qq "linux-image-$release" \
     "linux-headers-$release" $parts 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
  ls "$kdir"/debs/linux-image-*.deb >/dev/null 2>&1 || { say "download of linux-image-$release failed"; exit 1; }
  for deb in "$kdir"/debs/*.deb; do dpkg -x "$deb" "$kdir"; done
  rm -rf "$kdir/debs"      # keep the cache bounded: the unpacked tree is all the lab needs
  # trixie and later ship modules under usr/lib/modules (merged /usr); depmod and the links
  # below look under lib/modules
  [ -e "$kdir/lib" ] || [ ! -d "$kdir/usr/lib/modules" ] || ln -s usr/lib "$kdir/lib"
  # the packages' build/source links are absolute (/usr/src/...): point them into the cache
  hdr=$(ls -d "$kdir"/usr/src/linux-headers-"$release" 2>/dev/null || true)
  if [ -n "$hdr" ]; then
    ln -sfn "$hdr" "$kdir/lib/modules/$release/build"
    src=$(ls -d "$kdir"/usr/src/linux-headers-*-common 2>/dev/null | head -1)
    [ -n "$src" ] && ln -sfn "$src" "$kdir/lib/modules/$release/source"
  fi
  depmod -b "$kdir" "$release"
  touch "$kdir/.complete"
fi

# Older kernels of the same series (an ABI bump: 6.1.0-56 -> -57) leave the cache, and their
# links leave /lib/modules: the cache stays bounded.
for old in "$cache"/kernels/*; do
  name=$(basename "$old")
  [ -d "$old" ] && [ "$name" != "$release" ] || continue
  case $name in "$series".*|"$series"-*) ;; *) continue ;; esac
  say "removing $name (superseded by $release)"
  find "/lib/modules/$name" -maxdepth 1 -type l -lname "$old/*" -delete 2>/dev/null || true
  rmdir "/lib/modules/$name" 2>/dev/null || true
  rm -rf "$old"
done

# /lib/modules/RELEASE may already hold a build link from an installed headers package: link
# each entry that is missing rather than replacing the directory.
mkdir -p "/lib/modules/$release"
for entry in "$kdir/lib/modules/$release"/*; do
  name=$(basename "$entry")
  [ -e "/lib/modules/$release/$name" ] || ln -sfn "$entry" "/lib/modules/$release/$name"
done
# The kernel's own memory-hotplug selftest, taken from Debian's linux-source package: only that
# one folder is extracted (never a whole source tree), and nothing of it is committed.
selftest=$cache/selftests/$series/memory-hotplug
if [ ! -e "$selftest/mem-on-off-test.sh" ]; then
  say "extracting tools/testing/selftests/memory-hotplug from linux-source-$series"
  tmp=$cache/selftests/tmp && rm -rf "$tmp" && mkdir -p "$tmp"
  (cd "$tmp" && apt-get "${apt_opts[@]}" download -qq "linux-source-$series" 2>&1 \
     | grep -v "^W: Download is performed unsandboxed" || true)
  dpkg-deb --fsys-tarfile "$tmp"/linux-source-*.deb \
    | tar -xO "./usr/src/linux-source-$series.tar.xz" \
    | tar -xJ -C "$tmp" --wildcards "linux-source-$series/tools/testing/selftests/memory-hotplug/*"
  mkdir -p "$(dirname "$selftest")"
  mv "$tmp/linux-source-$series/tools/testing/selftests/memory-hotplug" "$selftest"
  rm -rf "$tmp"
fi

# The lab's test modules are built with the compiler the kernel's headers were made with
# (kernels.lab_module). A kernel of this machine's suite gets it here; another suite's kernel
# gets a userland of its own suite in the cache (debootstrap minbase, then make and the kernel's
# headers package, which brings that suite's gcc), and the module is built in a chroot of it.
# With --systemd-root that userland is made on any machine and also holds what a guest booting
# it as root needs: systemd (init), procps (the unit reloads with kill), python3 with bcc, psutil and orjson, and the
# headers bcc compiles against; the guest sees this checkout at /opt/memhp-observer.
autoconf=$kdir/usr/src/linux-headers-$release/include/generated/autoconf.h
gcc_major=$(( $(sed -n 's/^#define CONFIG_GCC_VERSION \([0-9]*\)$/\1/p' "$autoconf") / 10000 ))
userland_packages=(make "linux-headers-$release")
$systemd_root && userland_packages+=(systemd systemd-sysv procps python3 python3-bpfcc
                                     python3-psutil python3-orjson)
if [ "${VERSION_CODENAME:-}" = "$suite" ] && ! $systemd_root; then
  host_install make "gcc-$gcc_major"
else
  [ "${VERSION_CODENAME:-}" = "$suite" ] && host_install make "gcc-$gcc_major"
  userland=$cache/userland/$suite
  if [ ! -e "$userland/.complete" ]; then
    host_install debootstrap
    mirror=$(awk '$1 == "URIs:" {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    say "making a $suite userland in $userland (debootstrap minbase from $mirror; log in $userland.log)"
    rm -rf "$userland" && mkdir -p "$userland"
    debootstrap --variant=minbase "$suite" "$userland" "$mirror" > "$userland.log" 2>&1 \
      || { say "debootstrap of $suite failed: see $userland.log"; exit 1; }
    touch "$userland/.complete"
  fi
  in_userland() { chroot "$userland" env DEBIAN_FRONTEND=noninteractive "$@"; }
  missing=()
  for pkg in "${userland_packages[@]}"; do
    in_userland dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} into the $suite userland"
    # the suites the kernel was found in (its security updates too), not debootstrap's one line
    cp "${conf:-/etc/apt}/sources.list.d/"*.sources "$userland/etc/apt/sources.list.d/"
    rm -f "$userland/etc/apt/sources.list"
    # an unstable suite's Release file can be past its Valid-Until in the registry's mirror
    in_userland apt-get -o Acquire::Check-Valid-Until=false update -qq
    old_headers=$(in_userland dpkg-query -W -f='${Package}\n' 'linux-headers-*' 2>/dev/null || true)
    in_userland apt-get install -y -qq --no-install-recommends "${missing[@]}" \
      >> "$userland.log" 2>&1 || { say "installing ${missing[*]} failed: see $userland.log"; exit 1; }
    # headers of a superseded ABI leave, and the downloaded packages: the cache stays bounded
    for pkg in $old_headers; do
      case $pkg in *"${release%-amd64}"-*) ;; *) in_userland apt-get purge -y -qq "$pkg" >> "$userland.log" 2>&1 || true ;; esac
    done
    in_userland apt-get autoremove -y -qq >> "$userland.log" 2>&1 || true
    in_userland apt-get clean
  fi
  $systemd_root && mkdir -p "$userland/opt/memhp-observer"
fi

say "kernel $release ready ($(du -sh "$cache" | cut -f1) in $cache)"
