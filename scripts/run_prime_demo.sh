#!/usr/bin/env bash
# The main job in one command: generate numbers, start the master (embedded broker) and two
# compute nodes, find the primes, show the summary and the first primes, stop everything.
#
#   bash scripts/run_prime_demo.sh
#
# It works in a fresh directory (printed; kept for its logs, snapshots and primes.txt) on a
# free port. Environment: DEMO_DIR (working directory), DEMO_FILES (3), DEMO_COUNT (numbers
# per file, 100000), DEMO_NODES (2), DEMO_TIMEOUT (seconds the job may take, 600),
# FABRIC_PORT (default: a free port), PYTHON (python3).
set -euo pipefail

PYTHON=${PYTHON:-python3}
CODE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="${CODE}${PYTHONPATH:+:${PYTHONPATH}}"
DIR=${DEMO_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/fabric-demo.XXXXXX")}
FILES=${DEMO_FILES:-3}
COUNT=${DEMO_COUNT:-100000}
NODES=${DEMO_NODES:-2}
TIMEOUT=${DEMO_TIMEOUT:-600}
if [ -z "${FABRIC_PORT:-}" ]; then
    FABRIC_PORT=$("${PYTHON}" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
fi
export FABRIC_PORT
BROKER="mqtt://127.0.0.1:${FABRIC_PORT}"

mkdir -p "${DIR}"
cd "${DIR}"
echo "== working in ${DIR}"
trap 'echo "== stopping"; bash "${CODE}/scripts/stop_system.sh"' EXIT

echo "== generating ${FILES} files of ${COUNT} random 64-bit numbers (with a few blank, duplicate and bad lines)"
"${PYTHON}" "${CODE}/scripts/generate_numbers.py" data/input --files "${FILES}" --count "${COUNT}" \
    --bits 64 --duplicates 0.01 --blank 2 --bad 1

echo "== starting the master and ${NODES} compute nodes"
FABRIC_JOB=0 bash "${CODE}/scripts/start_system.sh" simple "${NODES}"

echo "== running the prime job"
status=0
timeout "${TIMEOUT}" "${PYTHON}" -m master.cli primes data/input/*.txt --broker "${BROKER}" \
    --output primes.txt --timeout 30 || status=$?
if [ "${status}" -eq 124 ]; then
    echo "run_prime_demo.sh: the job did not finish within ${TIMEOUT}s" >&2
fi

if [ -s primes.txt ]; then
    echo "== the first primes of $(wc -l <primes.txt) in ${DIR}/primes.txt"
    head -n 10 primes.txt
fi
echo "== logs in ${DIR}/logs, snapshots in ${DIR}/snapshots"
exit "${status}"
