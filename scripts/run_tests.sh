#!/usr/bin/env bash
# One command from a fresh machine to a test report: installs what the tests need, runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_test_deps.sh
exec python3 -m pytest -q "$@"
