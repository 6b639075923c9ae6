#!/usr/bin/env bash
# Host set-up shared by scripts/run.sh and scripts/test.sh. Idempotent: every step looks at what
# is really installed/mounted/linked and does nothing when it is already there.
# Runs as root. Changes on the host: Debian packages, a venv in .venv, the kernel-headers links
# under /lib/modules/$(uname -r) (only when the running kernel has none), tracefs mounted.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "setup: $*" >&2; }
[ "$(id -u)" = 0 ] || { say "must run as root (installs packages, links kernel headers, mounts tracefs)"; exit 1; }

# A package counts as installed only when dpkg says "install ok installed": a removed package's
# leftover configuration ("config-files") does not.
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

# Newest Debian headers of this suite's own kernel: 6.1.0-N on bookworm (which also carries
# 6.12.x+deb12 backports: the suite's own series is preferred), 6.12.x+deb13 on trixie. The ABI
# number moves between weeks, so it is looked up, never written down.
headers_pkg() {
  local all
  all=$(apt-cache search --names-only '^linux-headers-[0-9][^ ]*-amd64$' | awk '{print $1}')
  { echo "$all" | grep -E '^linux-headers-[0-9.]+-[0-9]+-amd64$' \
      || echo "$all" | grep -E '^linux-headers-[0-9.]+\+deb[0-9]+-amd64$'; } | sort -V | tail -1
}

need=(python3-venv python3-bpfcc prometheus)
missing=()
for p in "${need[@]}"; do installed "$p" || missing+=("$p"); done
kbuild=/lib/modules/$(uname -r)/build
if [ ! -e "$kbuild/include" ]; then
  hp=$(headers_pkg)
  if [ -z "$hp" ]; then apt-get update -qq; hp=$(headers_pkg); fi
  [ -n "$hp" ] || { say "no linux-headers-*-amd64 package in this machine's apt sources"; exit 1; }
  installed "$hp" || missing+=("$hp")
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  # policy-rc.d 101: do not start the packaged prometheus server; only promtool is wanted.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d; trap - EXIT
fi

# bcc compiles against /lib/modules/$(uname -r)/build; without it bcc runs `modprobe kheaders`
# by itself. A kernel with no headers package of its own gets Debian's: a mismatch that serves
# tracepoint programs only (DESIGN.md §2). Linked before bcc is ever imported.
if [ ! -e "$kbuild/include" ]; then
  hp=$(headers_pkg); ver=${hp#linux-headers-}; common=/usr/src/linux-headers-${ver%-amd64}-common
  [ -d "/usr/src/$hp" ] && [ -d "$common" ] || { say "$hp is installed but /usr/src/$hp or $common is missing"; exit 1; }
  mkdir -p "/lib/modules/$(uname -r)"
  ln -sfn "/usr/src/$hp" "$kbuild"
  ln -sfn "$common" "/lib/modules/$(uname -r)/source"
  say "linked $kbuild -> /usr/src/$hp (the running kernel $(uname -r) has no headers of its own)"
fi

# bcc attaches tracepoints through tracefs; a fresh machine has none mounted.
if [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing
  say "mounted tracefs on /sys/kernel/tracing"
fi

# The venv sees Debian's bcc (system site-packages); PyPI's "bcc" is an unrelated package.
venv=$top/.venv
stamp=$venv/.installed-$(sha256sum "$top/pyproject.toml" | cut -c1-16)
if [ ! -x "$venv/bin/python" ] || [ ! -e "$stamp" ] || ! "$venv/bin/python" -c 'import bcc, observer' 2>/dev/null; then
  say "creating venv $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
  # (this machine's pip config names local indexes that may be absent: drop those warnings only)
  "$venv/bin/pip" install -q --disable-pip-version-check -e "$top[test]" 2>&1 \
    | { grep -v "^WARNING: Location 'file:" || true; }
  rm -f "$venv"/.installed-*; touch "$stamp"
fi
