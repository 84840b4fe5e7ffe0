#!/usr/bin/env bash
# The README's test command: install what the tests need, then run every test,
# slow scenarios included. Pass pytest arguments to narrow it, e.g. -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
exec python3 -m pytest -p no:cacheprovider "$@"
