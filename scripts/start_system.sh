#!/usr/bin/env bash
# Start the compute fabric in the background, from the current directory:
#
#   scripts/start_system.sh simple [N]     the master (with its embedded MQTT broker), N compute
#                                          nodes worker-1..worker-N (default 3), and the prime job
#                                          over data/input/*.txt writing primes.txt
#   scripts/start_system.sh replicated [N] the MQTT broker as a process of its own, three
#                                          masters master-1..master-3 (one active, master-1 on
#                                          a fresh start; the others standbys copying its
#                                          journal, taking over if it dies), N compute nodes
#                                          and the prime job
#   scripts/start_system.sh worker ID      one more compute node, e.g. a restarted worker-2
#
# Logs and pid files go to logs/ (master.log or master-N.log, broker.log, worker-N.log,
# job.log), journals to state/ (state/master-N/ when replicated), snapshots to snapshots/
# (every 30 s). Stop everything with scripts/stop_system.sh.
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
    sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

die() {
    echo "start_system.sh: error: $*" >&2
    exit 2
}

alive() {  # pid file -> true if its process runs
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

any_master() {  # true if a master started from here runs (simple or replicated)
    local file
    for file in logs/master.pid logs/master-*.pid; do
        if alive "${file}"; then
            return 0
        fi
    done
    return 1
}

wait_for_line() {  # log pid text: until the log holds text (bounded), or the process exits
    local log=$1 pid=$2 text=$3 deadline=$((SECONDS + READY_TIMEOUT))
    until grep -q "${text}" "${log}"; do
        if ! kill -0 "${pid}" 2>/dev/null; then
            tail -n 20 "${log}" >&2
            die "$(basename "${log}" .log) exited at start (see ${log})"
        fi
        if [ "${SECONDS}" -ge "${deadline}" ]; then
            die "$(basename "${log}" .log) was not ready within ${READY_TIMEOUT}s (see ${log})"
        fi
        sleep 0.1
    done
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
        any_master || die "the master is not running (start it with: start_system.sh simple N)"
        start_worker "$2"
        exit 0
        ;;
    replicated)
        count=${2:-3}
        [[ "${count}" =~ ^[1-9][0-9]*$ ]] || die "the number of workers must be a positive integer, got '${count}'"
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
if any_master; then
    die "the system is already running (see logs/*.pid); stop it with scripts/stop_system.sh"
fi
if ! "${PYTHON}" -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[1])))" "${PORT}" 2>/dev/null; then
    die "port ${PORT} is already in use: stop what holds it (scripts/stop_system.sh) or set FABRIC_PORT"
fi

if [ "${mode}" = simple ]; then
    # -- the master and its embedded broker
    : >logs/master.log
    start master master.log "${PYTHON}" -m master.cli serve --port "${PORT}" --root "${ROOT}" \
        --state state --snapshots snapshots
    master_pid=$(cat logs/master.pid)
    wait_for_line logs/master.log "${master_pid}" "master ready"
    broker_pid=$(ps -o pid= --ppid "${master_pid}" | head -n 1 | tr -d ' ')
    [ -n "${broker_pid}" ] && echo "${broker_pid}" >logs/broker.pid
    echo "started the master on ${BROKER} (pid ${master_pid}, broker pid ${broker_pid:-?}, log logs/master.log)"
else
    # -- the broker on its own (it must outlive every master), then three masters
    : >logs/broker.log
    broker_args=(--port "${PORT}")
    [ -f broker.conf ] && broker_args+=(--config broker.conf)
    start broker broker.log "${PYTHON}" -m broker "${broker_args[@]}"
    wait_for_line logs/broker.log "$(cat logs/broker.pid)" "READY"
    echo "started the broker on ${BROKER} (pid $(cat logs/broker.pid), log logs/broker.log)"
    for i in 1 2 3; do
        : >"logs/master-${i}.log"
        start "master-${i}" "master-${i}.log" "${PYTHON}" -m master.cli serve --replica \
            --broker "${BROKER}" --root "${ROOT}" --id "master-${i}" --state "state/master-${i}" \
            --snapshots snapshots
    done
    # the most up-to-date journal wins (on a fresh start all are equal and master-1 wins)
    deadline=$((SECONDS + READY_TIMEOUT))
    until active=$(grep -l "master ready" logs/master-[123].log 2>/dev/null | head -n 1) \
            && [ -n "${active}" ]; do
        for i in 1 2 3; do
            kill -0 "$(cat "logs/master-${i}.pid")" 2>/dev/null \
                || die "master-${i} exited at start (see logs/master-${i}.log)"
        done
        [ "${SECONDS}" -lt "${deadline}" ] || die "no master became active within ${READY_TIMEOUT}s (see logs/master-N.log)"
        sleep 0.1
    done
    active=$(basename "${active}" .log)
    for i in 1 2 3; do
        [ "master-${i}" = "${active}" ] && continue
        wait_for_line "logs/master-${i}.log" "$(cat "logs/master-${i}.pid")" "standby ready"
    done
    echo "started ${active} (active, pid $(cat "logs/${active}.pid")) and two standbys," \
         "master-1..3 (pids $(cat logs/master-1.pid) $(cat logs/master-2.pid) $(cat logs/master-3.pid)); logs logs/master-N.log"
fi

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
    echo "watch: tail -f logs/master*.log; master-node nodes --broker ${BROKER}"
fi
if [ "${mode}" = replicated ]; then
    echo "fail over: kill -9 \$(cat logs/${active}.pid)   (a standby takes over; the job goes on)"
fi
echo "restart a stopped worker: scripts/start_system.sh worker worker-2  (or by hand: compute-node --id worker-2 --broker ${BROKER})"
echo "stop everything: scripts/stop_system.sh"
