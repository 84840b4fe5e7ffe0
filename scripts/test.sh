#!/usr/bin/env bash
# The README's test command: install what the tests need, then run every test,
# slow scenarios included, on two pytest-xdist workers (a module's tests stay on one, so
# its fixtures start once): most of a test's time is spent waiting on real daemons, so
# two workers on two cores take the suite from 32 to 18 minutes. Pass pytest arguments
# to narrow it, e.g. -m "not slow", or -n 0 to run it in this one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
# The tests start the daemon and its CLI a few hundred times, each a new interpreter
# importing the package. Where PYTHONDONTWRITEBYTECODE is set (as on the CI machines)
# nothing kept their compiled modules, and every start compiled gateway/ again: 0.6 of
# its 2.6 s on a slow machine.
python3 -m compileall -q gateway tests
exec python3 -m pytest -p no:cacheprovider -n 2 --dist loadscope "$@"
