#!/usr/bin/env bash
# Stop what scripts/start_system.sh started from the current directory, by the pid files in
# logs/: the prime job, then the compute nodes (they hand back unstarted tasks and say
# `offline`), then the master or the replicated masters (all at once, so the standbys do not
# take over one after another; journals keep queued work), then the broker. Each gets
# SIGTERM and a bounded time to exit, then SIGKILL. A pid file whose process is gone, or now
# belongs to another program, is removed without signalling anything.
#
# Environment: FABRIC_STOP_TIMEOUT (seconds to wait for each process, default 40).
set -euo pipefail

TIMEOUT=${FABRIC_STOP_TIMEOUT:-40}

if [ ! -d logs ]; then
    echo "stop_system.sh: no logs/ directory here: nothing was started from $(pwd)"
    exit 0
fi

ours() {  # pid pattern -> true if that pid is one of our processes
    local cmdline
    cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
    [[ "${cmdline}" == *"$2"* ]]
}

process_state() {  # pid -> "STATE START-TIME" from /proc (the start time tells a reused pid apart)
    local stat fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a fields <<<"${stat##*) }"
    echo "${fields[0]} ${fields[19]}"
}

running_since() {  # pid start-time -> true while that very process runs (a zombie has ended)
    local state
    state=$(process_state "$1") || return 1
    [[ "${state}" != [ZX]* && "${state#* }" == "$2" ]]
}

stop() {  # pid-file pattern
    local file=$1 pattern=$2 name pid since
    name=$(basename "${file}" .pid)
    pid=$(cat "${file}" 2>/dev/null || true)
    if ! [[ "${pid}" =~ ^[0-9]+$ ]] || ! since=$(process_state "${pid}") \
            || ! running_since "${pid}" "${since#* }"; then
        rm -f "${file}"
        return 0
    fi
    since=${since#* }
    if ! ours "${pid}" "${pattern}"; then
        echo "stop_system.sh: ${file}: pid ${pid} is not ${name} any more; not touching it" >&2
        rm -f "${file}"
        return 0
    fi
    kill -CONT "${pid}" 2>/dev/null || true
    kill -TERM "${pid}" 2>/dev/null || true
    # wait for the process itself to end, not for its command line to vanish: that happens
    # while it is still exiting
    local deadline=$((SECONDS + TIMEOUT)) killed=0
    while running_since "${pid}" "${since}"; do
        if [ "${killed}" = 0 ] && [ "${SECONDS}" -ge "${deadline}" ]; then
            echo "stop_system.sh: ${name} (pid ${pid}) ignored SIGTERM for ${TIMEOUT}s: killing it" >&2
            kill -KILL "${pid}" 2>/dev/null || true
            killed=1
            deadline=$((SECONDS + 10))
        elif [ "${killed}" = 1 ] && [ "${SECONDS}" -ge "${deadline}" ]; then
            echo "stop_system.sh: ${name} (pid ${pid}) still runs 10s after SIGKILL" >&2
            break
        fi
        sleep 0.1
    done
    rm -f "${file}"
    echo "stopped ${name} (pid ${pid})"
}

shopt -s nullglob
[ -f logs/job.pid ] && stop logs/job.pid "master.cli primes"
for file in logs/*.pid; do
    case "$(basename "${file}")" in
        job.pid|master.pid|master-*.pid|broker.pid) ;;
        *) stop "${file}" "node.cli" & ;;
    esac
done
wait
[ -f logs/master.pid ] && stop logs/master.pid "master.cli serve"
for file in logs/master-*.pid; do
    stop "${file}" "master.cli serve" &
done
wait
[ -f logs/broker.pid ] && stop logs/broker.pid " -m broker "
exit 0
