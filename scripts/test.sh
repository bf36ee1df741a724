#!/usr/bin/env bash
# Install what is needed (idempotent), check style and types, and run the whole test suite.
#   scripts/test.sh [pytest args...]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/install.sh"
cd "$repo"
echo "== ruff" && .venv/bin/ruff check .
echo "== mypy" && .venv/bin/mypy
echo "== pytest"
exec .venv/bin/pytest -q -p no:cacheprovider --durations=10 "$@" tests
