#!/usr/bin/env bash
# memhp-observer on this host, with all set-up (scripts/setup.sh). Run as root.
# Arguments go to memhp-observer; with none, it shows a snapshot.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
bash "$top/scripts/setup.sh"
[ $# -gt 0 ] || set -- snapshot
exec "$top/.venv/bin/memhp-observer" "$@"
