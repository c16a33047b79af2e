#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by .ci/slurm/start.sh (slurmd, slurmctld, munged).
# Idempotent: daemons that do not run are skipped. Only the processes named in the pid files
# written by start.sh are signalled. Set SLURM_CI_KEEP_MUNGE=1 to leave munged running.
set -uo pipefail

RUN_DIR=/run/slurm
MUNGE_RUN=/run/munge

log() { echo "slurm/stop.sh: $*" >&2; }

stop_pidfile() {
    local name="$1" pidf="$2" pid
    if [ ! -s "$pidf" ]; then
        log "$name: not running (no $pidf)"
        return 0
    fi
    pid="$(cat "$pidf")"
    if ! kill -0 "$pid" 2>/dev/null; then
        log "$name: not running (stale pid $pid)"
        rm -f "$pidf"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) ignores SIGTERM: sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    if kill -0 "$pid" 2>/dev/null; then
        log "ERROR: $name (pid $pid) still runs"
        return 1
    fi
    rm -f "$pidf"
    log "$name: stopped (pid $pid)"
}

[ "$(id -u)" -eq 0 ] || { log "ERROR: must run as root"; exit 1; }
rc=0
stop_pidfile slurmd "$RUN_DIR/slurmd.pid" || rc=1
stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid" || rc=1
if [ "${SLURM_CI_KEEP_MUNGE:-0}" != 1 ]; then
    stop_pidfile munged "$MUNGE_RUN/munged.pid" || rc=1
fi
exit "$rc"
