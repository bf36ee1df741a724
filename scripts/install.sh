#!/usr/bin/env bash
# Installs everything blixfs needs on Debian 12, idempotently:
#   Debian packages (fuse3, libfuse3-dev, pkg-config, qemu-utils, a C compiler; qemu-system-x86,
#   e2fsprogs and cpio for the guest that scripts/build_guest.sh builds and the guest tests boot),
#   a venv at .venv in the repository, and blixfs with its dev extras into it.
# Fast when everything is already there: apt and pip are skipped when nothing is missing.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

log() { printf '[install] %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "installing Debian packages needs root: run as root, or install by hand: apt-get install $*"
    exit 1
  fi
}

# --- Debian packages -------------------------------------------------------
debs=(fuse3 libfuse3-dev pkg-config qemu-utils gcc python3-dev iproute2 attr)
# The bootable guest (scripts/build_guest.sh, tests/guest, scripts/bench_vm.py): qemu to boot it
# under TCG, mkfs.ext4 -d to make its root without a loop mount, cpio for its initramfs.
# Its kernel and busybox are only downloaded (apt-get download), never installed here.
debs+=(qemu-system-x86 e2fsprogs cpio)
# The dashboard's real-browser test (tests/multinode/test_dashboard_browser.py): Debian's
# headless chromium and its chromedriver, driven by selenium (Playwright's browser download
# is not reachable from CI).
debs+=(chromium chromium-driver)
# A Python 3.11 interpreter that can make a venv: one on PATH (pyenv, a distro build),
# else Debian's. Debian's python3 lacks ensurepip (so `python3 -m venv` fails) until
# python3-venv is installed: that is checked, not just the version.
py=""
for cand in python3.11 python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    py=$(command -v "$cand"); break
  fi
done
if [ -z "$py" ] || ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
  debs+=(python3 python3-venv python3-dev)
fi

missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  need_root "${missing[@]}"
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -n "$py" ] || py=$(command -v python3.11 || command -v python3)
# ensurepip may be absent in Debian's python without python3-venv; checked above.
"$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
  log "blixfs needs Python 3.11; found $("$py" --version)"; exit 1; }

# --- venv and the package ---------------------------------------------------
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  log "creating .venv with $py"
  rm -rf .venv
  "$py" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last successful install.
stamp=.venv/.blixfs-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c 'import blixfs, mount, pyfuse3, iroh' 2>/dev/null; then
  log "pip install -e .[dev]"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
log "ready: $repo/.venv"
