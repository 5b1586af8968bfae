#!/usr/bin/env bash
# Start the compute fabric in the background, from the current directory:
#
#   scripts/start_system.sh simple [N]     the master (with its embedded MQTT broker), N compute
#                                          nodes worker-1..worker-N (default 3), and the prime job
#                                          over data/input/*.txt writing primes.txt
#   scripts/start_system.sh worker ID      one more compute node, e.g. a restarted worker-2
#   scripts/start_system.sh replicated N   not available yet (comes with master replication)
#
# Logs and pid files go to logs/ (master.log, worker-N.log, job.log), the master's journal to
# state/, snapshots to snapshots/ (every 30 s). Stop everything with scripts/stop_system.sh.
#
# Environment: FABRIC_PORT (broker port, default 1883), FABRIC_ROOT (topic root, default
# fabric), FABRIC_CAPACITY (tasks each node runs at once, default 1), FABRIC_JOB=0 (do not
# start the prime job), PYTHON (default python3).
set -euo pipefail

PYTHON=${PYTHON:-python3}
PORT=${FABRIC_PORT:-1883}
ROOT=${FABRIC_ROOT:-fabric}
CAPACITY=${FABRIC_CAPACITY:-1}
BROKER="mqtt://127.0.0.1:${PORT}"
CODE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="${CODE}${PYTHONPATH:+:${PYTHONPATH}}"
READY_TIMEOUT=30

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

die() {
    echo "start_system.sh: error: $*" >&2
    exit 2
}

alive() {  # pid file -> true if its process runs
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start() {  # name log command... : start in its own session, record the pid
    local name=$1 log=$2
    shift 2
    setsid "$@" </dev/null >>"logs/${log}" 2>&1 &
    echo $! >"logs/${name}.pid"
}

start_worker() {
    local id=$1
    if alive "logs/${id}.pid"; then
        die "${id} is already running (pid $(cat "logs/${id}.pid"))"
    fi
    start "${id}" "${id}.log" "${PYTHON}" -m node.cli --broker "${BROKER}" --root "${ROOT}" \
        --id "${id}" --capacity "${CAPACITY}"
    echo "started ${id} (pid $(cat "logs/${id}.pid"), log logs/${id}.log)"
}

mode=${1:-}
case "${mode}" in
    simple)
        count=${2:-3}
        [[ "${count}" =~ ^[1-9][0-9]*$ ]] || die "the number of workers must be a positive integer, got '${count}'"
        ;;
    worker)
        [ -n "${2:-}" ] || die "usage: start_system.sh worker ID (e.g. worker-2)"
        mkdir -p logs
        alive logs/master.pid || die "the master is not running (start it with: start_system.sh simple N)"
        start_worker "$2"
        exit 0
        ;;
    replicated)
        echo "start_system.sh: replicated mode is not available yet: it comes with master" \
             "replication. Use: start_system.sh simple N" >&2
        exit 2
        ;;
    -h|--help)
        usage
        exit 0
        ;;
    *)
        usage
        exit 2
        ;;
esac

mkdir -p logs data/input data/output
if alive logs/master.pid; then
    die "the system is already running (master pid $(cat logs/master.pid)); stop it with scripts/stop_system.sh"
fi
if ! "${PYTHON}" -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[1])))" "${PORT}" 2>/dev/null; then
    die "port ${PORT} is already in use: stop what holds it (scripts/stop_system.sh) or set FABRIC_PORT"
fi

# -- the master and its embedded broker
: >logs/master.log
start master master.log "${PYTHON}" -m master.cli serve --port "${PORT}" --root "${ROOT}" \
    --state state --snapshots snapshots
master_pid=$(cat logs/master.pid)
deadline=$((SECONDS + READY_TIMEOUT))
until grep -q "master ready" logs/master.log; do
    if ! kill -0 "${master_pid}" 2>/dev/null; then
        tail -n 20 logs/master.log >&2
        die "the master exited at start (see logs/master.log)"
    fi
    if [ "${SECONDS}" -ge "${deadline}" ]; then
        die "the master was not ready within ${READY_TIMEOUT}s (see logs/master.log)"
    fi
    sleep 0.1
done
broker_pid=$(ps -o pid= --ppid "${master_pid}" | head -n 1 | tr -d ' ')
[ -n "${broker_pid}" ] && echo "${broker_pid}" >logs/broker.pid
echo "started the master on ${BROKER} (pid ${master_pid}, broker pid ${broker_pid:-?}, log logs/master.log)"

# -- the compute nodes
for i in $(seq 1 "${count}"); do
    start_worker "worker-${i}"
done

# -- the prime job
shopt -s nullglob
inputs=(data/input/*.txt)
if [ "${FABRIC_JOB:-1}" = "0" ]; then
    echo "not starting the prime job (FABRIC_JOB=0)"
elif [ "${#inputs[@]}" -eq 0 ]; then
    echo "start_system.sh: no input files in data/input/: the prime job is not started" >&2
    echo "  create some with: ${PYTHON} ${CODE}/scripts/generate_numbers.py data/input" >&2
else
    start job job.log "${PYTHON}" -m master.cli primes "${inputs[@]}" --broker "${BROKER}" \
        --root "${ROOT}" --output primes.txt --timeout 30
    echo "started the prime job over ${#inputs[@]} files (pid $(cat logs/job.pid), log logs/job.log) -> primes.txt"
fi

if alive logs/job.pid; then
    echo "watch: tail -f logs/job.log; wc -l primes.txt; master-node nodes --broker ${BROKER}"
else
    echo "watch: tail -f logs/master.log; master-node nodes --broker ${BROKER}"
fi
echo "restart a stopped worker: scripts/start_system.sh worker worker-2  (or by hand: compute-node --id worker-2 --broker ${BROKER})"
echo "stop everything: scripts/stop_system.sh"
