#!/usr/bin/env bash
# Install what is needed (idempotent) and run the main job: mount the embedded
# default node (a local node, no config) at MOUNTPOINT in the foreground until Ctrl-C.
#   scripts/run.sh [MOUNTPOINT] [blixfs mount options...]     (default /mnt/images)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/install.sh"
mnt=${1:-/mnt/images}
[ $# -gt 0 ] && shift
mkdir -p "$mnt"
exec "$repo/.venv/bin/blixfs" mount "$mnt" "$@"
