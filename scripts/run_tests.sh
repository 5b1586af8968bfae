#!/usr/bin/env bash
# One command from a fresh machine to a test report: installs what the tests need, runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_test_deps.sh
# --fail-on-skip: a skipped test fails the run, as in CI (tests/skip_allowlist.txt)
exec python3 -m pytest -q --fail-on-skip "$@"
