#!/usr/bin/env bash
# Host set-up shared by scripts/run.sh and scripts/test.sh. Idempotent: every step looks at what
# is really installed/mounted/linked and does nothing when it is already there.
# Runs as root. Changes on the host: Debian packages, a venv in .venv, the kernel-headers links
# under /lib/modules/$(uname -r) (only when the running kernel has none), tracefs mounted.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "setup: $*" >&2; }
[ "$(id -u)" = 0 ] || { say "must run as root (installs packages, links kernel headers, mounts tracefs)"; exit 1; }

. "$top/scripts/apt.sh"
host_apt_stamp=/var/lib/apt/periodic/memhp-update-stamp   # beside apt's own update-success-stamp

need=(python3-venv python3-bpfcc prometheus)
# --test-tools: what the tests check the observer against (node_exporter's zoneinfo collector,
# Alertmanager receiving the alert rules' alerts, systemd's journald and systemd-analyze, capsh,
# pahole and bpftool reading BTF, bpftrace the benchmarks' start-up reference in a lab guest);
# their services are not started either
[ "${1:-}" != --test-tools ] || need+=(prometheus-node-exporter prometheus-alertmanager dwarves bpftool systemd libcap2-bin bpftrace)
missing=()
for p in "${need[@]}"; do installed "$p" || missing+=("$p"); done
kbuild=/lib/modules/$(uname -r)/build
hp=
if [ ! -e "$kbuild/include" ] || [ ${#missing[@]} -gt 0 ]; then
  apt_fresh "$host_apt_stamp"
fi
if [ ! -e "$kbuild/include" ]; then
  hp=$(apt-cache depends linux-headers-amd64 2>/dev/null | pick_headers)
  [ -n "$hp" ] || { say "no linux-headers-amd64 in this machine's apt sources: cannot tell which headers to link"; exit 1; }
  installed "$hp" || missing+=("$hp")
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  # policy-rc.d 101: start no packaged server (prometheus, node_exporter); only their tools are wanted.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d; trap - EXIT
fi

# bcc compiles against /lib/modules/$(uname -r)/build; without it bcc runs `modprobe kheaders`
# by itself. A kernel with no headers package of its own gets Debian's: a mismatch that serves
# tracepoint programs only (DESIGN.md §2; the probe loader refuses struct offsets from them).
# Linked before bcc is ever imported.
if [ -n "$hp" ]; then
  ver=${hp#linux-headers-}
  for dir in "/usr/src/$hp" "/usr/src/linux-headers-${ver%-amd64}-common"; do
    [ -d "$dir" ] || { say "$hp is installed, but $dir, which bcc needs, is not there"; exit 1; }
  done
  mkdir -p "/lib/modules/$(uname -r)"
  ln -sfn "/usr/src/$hp" "$kbuild"
  ln -sfn "/usr/src/linux-headers-${ver%-amd64}-common" "/lib/modules/$(uname -r)/source"
  say "linked $kbuild -> /usr/src/$hp (the running kernel $(uname -r) has no headers of its own)"
fi

# bcc attaches tracepoints through tracefs; a fresh machine has none mounted.
if [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing
  say "mounted tracefs on /sys/kernel/tracing"
fi

# The venv sees Debian's bcc (system site-packages); PyPI's "bcc" is an unrelated package.
venv=$top/.venv
# Editable as a path in a .pth (compat): the default editable install imports a finder at every
# interpreter start (pathlib, importlib.util and more: a sixth of the daemon's start-up imports)
install=(-e "$top[test]" --config-settings editable_mode=compat)
stamp=$venv/.installed-$( { cat "$top/pyproject.toml"; echo "${install[*]}"; } | sha256sum | cut -c1-16)
if [ ! -x "$venv/bin/python" ] || [ ! -e "$stamp" ] || ! "$venv/bin/python" -c 'import bcc, observer' 2>/dev/null; then
  say "creating venv $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
  # (this machine's pip config names local indexes that may be absent: drop those warnings only)
  "$venv/bin/pip" install -q --disable-pip-version-check "${install[@]}" 2>&1 \
    | { grep -v "^WARNING: Location 'file:" || true; }
  rm -f "$venv"/.installed-*; touch "$stamp"
fi

# The checkout's bytecode, as an installed package has it: a lab guest sees this tree read-only
# and would otherwise compile every module at each start.
"$venv/bin/python" -m compileall -q "$top/observer" "$top/bench" > /dev/null
