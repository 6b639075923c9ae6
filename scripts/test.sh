#!/usr/bin/env bash
# The whole test suite, with all set-up (scripts/setup.sh). Run as root. CI runs exactly this.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
start=$(date +%s)
bash "$top/scripts/setup.sh" --test-tools
bash "$top/scripts/setup-lab.sh"                 # Debian 6.1 (bookworm)
bash "$top/scripts/setup-lab.sh" --series 6.12 --systemd-root   # Debian 6.12 (trixie, private apt configuration; its userland boots with systemd)
bash "$top/scripts/setup-lab.sh" --series 5.10   # Debian 5.10 (bullseye; a userland with its gcc-10 for the test modules)
bash "$top/scripts/setup-lab.sh" --series 7.2    # Debian 7.2 (unstable: CONFIG_DEVICE_PRIVATE; a userland with its gcc-16)
echo "test: set-up took $(( $(date +%s) - start )) s" >&2
cd "$top"
exec .venv/bin/python -m pytest -q "$@"
