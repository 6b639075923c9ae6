#!/usr/bin/env bash
# memhp-observer on this host, with all set-up (scripts/setup.sh). Run as root.
# Arguments go to memhp-observer; with none, it runs the daemon (/metrics on 127.0.0.1:9477).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
bash "$top/scripts/setup.sh"
[ $# -gt 0 ] || set -- run
exec "$top/.venv/bin/memhp-observer" "$@"
